package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	"fwp/api"
	"fwp/internal/peercred"
	"fwp/mgmt"
)

// Role is what a peer may do, decided from the credentials the kernel
// recorded when it connected (SO_PEERCRED, SO_PEERGROUPS).
type Role uint8

const (
	// RoleNone is any local user: open a session, and query a redirect
	// whose target it is (a proxy). Nothing about the policy, the other
	// sessions or the traffic.
	RoleNone Role = iota
	// RoleReader may list and read the policy, explain decisions, read
	// net events and subscribe to changes; provider-context data only as
	// its length and SHA-256.
	RoleReader
	// RoleAdmin may do all of that and change the policy.
	RoleAdmin
)

func (r Role) String() string {
	switch r {
	case RoleReader:
		return "reader"
	case RoleAdmin:
		return "admin"
	}
	return "none"
}

// Right is one right of the access model. As BFE's security descriptors
// do (FWPM_ACTRL_*), fwpd checks each call against the right it needs,
// not against a role, so that a role is only a set of rights.
type Right uint16

const (
	RightOpen       Right = 1 << iota // open and close one's own session (FWPM_ACTRL_OPEN)
	RightEnum                         // list objects and sessions (FWPM_ACTRL_ENUM)
	RightRead                         // read an object, explain a decision (FWPM_ACTRL_READ)
	RightReadData                     // read provider-context data itself
	RightWriteTxn                     // begin, commit and abort a write transaction (FWPM_ACTRL_BEGIN_WRITE_TXN)
	RightAdd                          // add objects (FWPM_ACTRL_ADD)
	RightDelete                       // delete objects (FWPM_ACTRL_DELETE)
	RightSubscribe                    // object change notifications (FWPM_ACTRL_SUBSCRIBE)
	RightReadEvents                   // net events: connections, pids, executables (FWPM_ACTRL_READ_STATS)
)

var rightNames = []string{"open", "enumerate", "read", "read provider-context data", "write transaction", "add", "delete", "subscribe", "read net events"}

func (r Right) String() string {
	for i, n := range rightNames {
		if r == 1<<i {
			return n
		}
	}
	return fmt.Sprintf("rights %#x", uint16(r))
}

// Rights returns a role's rights. QueryRedirect needs only RightOpen but
// answers only the redirect's target process (or root).
func (r Role) Rights() Right {
	none := RightOpen
	reader := none | RightEnum | RightRead | RightSubscribe | RightReadEvents
	switch r {
	case RoleReader:
		return reader
	case RoleAdmin:
		return reader | RightReadData | RightWriteTxn | RightAdd | RightDelete
	}
	return none
}

// role decides a peer's role: root (unless NoRootAdmin), the admin users
// and members of the admin groups are admins; then the reader users and
// groups are readers; everyone else has no role. Groups are the
// connect-time ones (SO_PEERGROUPS), not the process's current ones: its
// pid may be gone or reused by now.
func (s *Server) role(c peercred.Cred) Role {
	in := func(uids, gids []uint32) bool {
		if slices.Contains(uids, c.UID) || slices.Contains(gids, c.GID) {
			return true
		}
		for _, g := range c.Groups {
			if slices.Contains(gids, g) {
				return true
			}
		}
		return false
	}
	switch {
	case c.UID == 0 && !s.cfg.NoRootAdmin, in(s.cfg.AdminUIDs, s.cfg.AdminGIDs):
		return RoleAdmin
	case in(s.cfg.ReaderUIDs, s.cfg.ReaderGIDs):
		return RoleReader
	}
	return RoleNone
}

func (s *Server) isAdmin(c peercred.Cred) bool { return s.role(c) == RoleAdmin }

// need checks that the caller holds every right in r; what names the
// operation in the error.
func (s *Server) need(ctx context.Context, r Right, what string) (Role, error) {
	cred, err := peercred.FromContext(ctx)
	if err != nil {
		return RoleNone, fmt.Errorf("%w: %w", mgmt.ErrAccessDenied, err)
	}
	role := s.role(cred)
	if missing := r &^ role.Rights(); missing != 0 {
		for i := range rightNames {
			if m := Right(1 << i); missing&m != 0 {
				return role, fmt.Errorf("%w: uid %d (role %s) may not %s: it needs the %q right (see fwpd --reader-group, --admin-group)",
					mgmt.ErrAccessDenied, cred.UID, role, what, m.String())
			}
		}
	}
	return role, nil
}

// redact withholds provider-context data from a role that may not read
// it, leaving its length and SHA-256, so that a reader can tell two
// contexts apart or check one against a known value without learning it.
func redact(role Role, o mgmt.Object) mgmt.Object {
	if o.ProviderContext == nil || role.Rights()&RightReadData != 0 {
		return o
	}
	c := *o.ProviderContext
	sum := sha256.Sum256(c.Data)
	c.DataRedacted, c.DataLength, c.DataSHA256, c.Data = true, len(c.Data), hex.EncodeToString(sum[:]), nil
	o.ProviderContext = &c
	return o
}

// methodRights is the least each RPC needs, checked before its handler
// runs (which checks more where the request says more: Apply's ops, Get
// and List's data). An RPC missing here is refused to everyone, so a new
// one cannot be open by default: decide its right, add it here and to
// docs/security.md's matrix.
var methodRights = map[string]Right{
	api.Management_OpenSession_FullMethodName:   RightOpen,
	api.Management_CloseSession_FullMethodName:  RightOpen,
	api.Management_QueryRedirect_FullMethodName: RightOpen, // answered to the redirect's target only
	api.Management_Version_FullMethodName:       RightOpen, // the build only
	api.Management_Sessions_FullMethodName:      RightEnum,
	api.Management_List_FullMethodName:          RightEnum | RightRead,
	api.Management_Get_FullMethodName:           RightRead,
	api.Management_Explain_FullMethodName:       RightRead,
	api.Management_NetEvents_FullMethodName:     RightReadEvents,
	api.Management_Subscribe_FullMethodName:     RightSubscribe,
	api.Management_Begin_FullMethodName:         RightWriteTxn,
	api.Management_Commit_FullMethodName:        RightWriteTxn,
	api.Management_Abort_FullMethodName:         RightWriteTxn,
	api.Management_Apply_FullMethodName:         RightWriteTxn,
}

// authorize is the interceptors' check of methodRights.
func (s *Server) authorize(ctx context.Context, method string) error {
	r, ok := methodRights[method]
	if !ok {
		return fmt.Errorf("%w: %s has no access rule (internal/server methodRights)", mgmt.ErrAccessDenied, method)
	}
	_, err := s.need(ctx, r, "call "+method[strings.LastIndexByte(method, '/')+1:])
	return err
}
