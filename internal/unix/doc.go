// Package unix is fwp's only door to golang.org/x/sys/unix: the few Linux
// calls the kernel datapath and its tests need, with typed results (netip
// addresses, errno values) so the rest of the module never touches raw
// socket options or ioctls.
package unix
