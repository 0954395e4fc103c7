package server

import (
	"context"

	"fwp/api"
	"fwp/internal/version"
)

// Version returns the daemon's build, to anyone who can reach the socket:
// it is what `fwpd --version` prints, nothing about the policy.
func (s *Server) Version(context.Context, *api.Empty) (*api.VersionInfo, error) {
	v := version.Get()
	return &api.VersionInfo{Version: v.Version, Revision: v.Revision, GoVersion: v.GoVersion, Modified: v.Modified}, nil
}
