// Package version reads the build's version from the Go build
// information: the main module's version and the VCS revision the go
// command stamped, for fwpd --version and fwpctl version.
package version
