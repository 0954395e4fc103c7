// Package server implements fwpd's gRPC service over a mgmt.Manager:
// sessions held by a stream, authorization from SO_PEERCRED, typed errors
// as statuses.
package server
