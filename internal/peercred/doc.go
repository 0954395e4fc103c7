// Package peercred gives a gRPC server the kernel's credentials of each
// unix-socket peer (SO_PEERCRED), for authorization, and reads a process's
// supplementary groups.
package peercred
