// Package calloute2e holds the end-to-end tests of remote callouts: a real
// fwpd (built by the tests) and callout programs in processes of their own
// (this test binary, re-executed), talking over fwpd's callout socket.
package calloute2e
