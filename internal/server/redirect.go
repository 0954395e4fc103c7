package server

import (
	"context"
	"fmt"
	"net/netip"

	"fwp/api"
	"fwp/internal/peercred"
	"fwp/mgmt"
	"fwp/proxy"
)

// RedirectSource finds the redirect of a connection a proxy accepted, by
// the accepted socket's local and remote addresses; an unknown connection
// gives an error wrapping proxy.ErrNotFound.
type RedirectSource interface {
	QueryProxyRedirect(local, remote netip.AddrPort) (r proxy.Redirect, original netip.AddrPort, err error)
}

// QueryRedirect answers a proxy's QueryRedirectRecords and
// QueryRedirectContext. Only the redirect's target process, as SO_PEERCRED
// names it, or root gets an answer: the context can hold the flow's
// secrets, and the records let a connection escape the redirect.
func (s *Server) QueryRedirect(ctx context.Context, req *api.QueryRedirectRequest) (*api.RedirectInfo, error) {
	if s.cfg.Redirects == nil {
		return nil, fmt.Errorf("%w: fwpd runs without a kernel datapath", proxy.ErrNotSupported)
	}
	if _, err := s.need(ctx, RightOpen, "query redirects"); err != nil {
		return nil, err
	}
	cred, err := peercred.FromContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", mgmt.ErrAccessDenied, err)
	}
	local, err := netip.ParseAddrPort(req.GetLocal())
	if err != nil {
		return nil, fmt.Errorf("%w: local address: %v", proxy.ErrInvalidArgument, err)
	}
	remote, err := netip.ParseAddrPort(req.GetRemote())
	if err != nil {
		return nil, fmt.Errorf("%w: remote address: %v", proxy.ErrInvalidArgument, err)
	}
	r, orig, err := s.cfg.Redirects.QueryProxyRedirect(local, remote)
	if err != nil {
		return nil, err
	}
	if cred.UID != 0 && (r.TargetPID == 0 || r.TargetPID != cred.PID) {
		return nil, fmt.Errorf("%w: redirect target pid %d, caller pid %d", proxy.ErrAccessDenied, r.TargetPID, cred.PID)
	}
	return &api.RedirectInfo{Records: r.Records, Context: r.Context, Original: orig.String(), TargetPid: r.TargetPID}, nil
}
