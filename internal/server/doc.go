// Package server implements fwpd's gRPC service over a mgmt.Manager:
// sessions held by a stream, authorization from the peer's connect-time
// credentials (SO_PEERCRED, SO_PEERGROUPS), typed errors as statuses, and
// a bound on the connections served at once (LimitListener); and the
// callout socket (Callouts), where callout programs register remote
// callouts with the engine.
package server
