package mgmt

import "errors"

// Sentinel errors of the management plane, in addition to the engine's
// (engine.ErrNotFound, engine.ErrInUse, ...), which pass through wrapped.
var (
	ErrTimeout         = errors.New("fwp: timed out waiting for the transaction lock") // FWP_E_TIMEOUT
	ErrLifetime        = errors.New("fwp: object references one with a shorter lifetime")
	ErrDynamicSession  = errors.New("fwp: a dynamic session cannot add non-dynamic objects") // FWP_E_DYNAMIC_SESSION_IN_PROGRESS
	ErrSessionNotFound = errors.New("fwp: session not found")                                // FWP_E_SESSION_ABORTED
	ErrAccessDenied    = errors.New("fwp: access denied")                                    // FWP_E_ACCESS_DENIED
	ErrInvalidPolicy   = errors.New("fwp: invalid policy")
	ErrTooLarge        = errors.New("fwp: request too large")
	ErrStore           = errors.New("fwp: persistent store failed")
	ErrInternal        = errors.New("fwp: internal error") // a bug: the daemon logged it and kept serving
)
