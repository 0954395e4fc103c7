package engine

import "errors"

// Sentinel errors, modelled on WFP's FWP_E_* codes. Every error the engine
// returns wraps one of them, so callers test with errors.Is.
var (
	ErrNotFound                 = errors.New("fwp: object not found")                          // FWP_E_*_NOT_FOUND
	ErrAlreadyExists            = errors.New("fwp: object already exists")                     // FWP_E_ALREADY_EXISTS
	ErrInUse                    = errors.New("fwp: object is in use")                          // FWP_E_IN_USE
	ErrInvalidLayer             = errors.New("fwp: invalid layer")                             // FWP_E_LAYER_NOT_FOUND
	ErrInvalidField             = errors.New("fwp: field not in layer")                        // FWP_E_CONDITION_NOT_FOUND
	ErrInvalidCondition         = errors.New("fwp: invalid condition")                         // FWP_E_INVALID_CONDITION
	ErrInvalidMatchType         = errors.New("fwp: invalid match type")                        // FWP_E_MATCH_TYPE_MISMATCH
	ErrTypeMismatch             = errors.New("fwp: value type mismatch")                       // FWP_E_TYPE_MISMATCH
	ErrInvalidValue             = errors.New("fwp: invalid value")                             // FWP_E_INVALID_RANGE et al.
	ErrInvalidWeight            = errors.New("fwp: invalid weight")                            // FWP_E_INVALID_WEIGHT
	ErrInvalidAction            = errors.New("fwp: invalid action")                            // FWP_E_INVALID_ACTION_TYPE
	ErrInvalidFlags             = errors.New("fwp: invalid flags")                             // FWP_E_INVALID_FLAGS
	ErrCalloutNotFound          = errors.New("fwp: callout not found")                         // FWP_E_CALLOUT_NOT_FOUND
	ErrIncompatibleLayer        = errors.New("fwp: callout's layer differs from the filter's") // FWP_E_INCOMPATIBLE_LAYER
	ErrInvalidArgument          = errors.New("fwp: invalid argument")                          // STATUS_INVALID_PARAMETER
	ErrTxnInProgress            = errors.New("fwp: transaction in progress")                   // FWP_E_TXN_IN_PROGRESS
	ErrNoTxnInProgress          = errors.New("fwp: no transaction in progress")                // FWP_E_NO_TXN_IN_PROGRESS
	ErrTxnAborted               = errors.New("fwp: transaction aborted")                       // FWP_E_TXN_ABORTED
	ErrCalloutAlreadyRegistered = errors.New("fwp: callout already registered")
)

// ErrInvalidParameter is ErrInvalidArgument under WFP's name, for the
// callout functions that document STATUS_INVALID_PARAMETER (a redirect
// handle that is not a live one).
var ErrInvalidParameter = ErrInvalidArgument
