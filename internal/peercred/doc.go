// Package peercred gives a gRPC server the kernel's credentials of each
// unix-socket peer (SO_PEERCRED, and its supplementary groups from
// SO_PEERGROUPS), as they were at connect(), for authorization.
package peercred
