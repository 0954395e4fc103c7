package api

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"fwp/engine"
	"fwp/mgmt"
	"fwp/proxy"
)

// errorDomain marks fwp's ErrorInfo details.
const errorDomain = "fwp"

// sentinels maps each typed error to its wire reason and gRPC code. The
// order matters only for the status code: the first match decides it.
var sentinels = []struct {
	reason string
	err    error
	code   codes.Code
}{
	{"ACCESS_DENIED", mgmt.ErrAccessDenied, codes.PermissionDenied},
	{"TOO_LARGE", mgmt.ErrTooLarge, codes.ResourceExhausted},
	{"TIMEOUT", mgmt.ErrTimeout, codes.DeadlineExceeded},
	{"SESSION_NOT_FOUND", mgmt.ErrSessionNotFound, codes.FailedPrecondition},
	{"INVALID_POLICY", mgmt.ErrInvalidPolicy, codes.InvalidArgument},
	{"LIFETIME", mgmt.ErrLifetime, codes.FailedPrecondition},
	{"DYNAMIC_SESSION", mgmt.ErrDynamicSession, codes.FailedPrecondition},
	{"STORE", mgmt.ErrStore, codes.Internal},
	{"INTERNAL", mgmt.ErrInternal, codes.Internal},
	{"NOT_FOUND", engine.ErrNotFound, codes.NotFound},
	{"ALREADY_EXISTS", engine.ErrAlreadyExists, codes.AlreadyExists},
	{"IN_USE", engine.ErrInUse, codes.FailedPrecondition},
	{"INVALID_LAYER", engine.ErrInvalidLayer, codes.InvalidArgument},
	{"INVALID_FIELD", engine.ErrInvalidField, codes.InvalidArgument},
	{"INVALID_CONDITION", engine.ErrInvalidCondition, codes.InvalidArgument},
	{"INVALID_MATCH_TYPE", engine.ErrInvalidMatchType, codes.InvalidArgument},
	{"TYPE_MISMATCH", engine.ErrTypeMismatch, codes.InvalidArgument},
	{"INVALID_VALUE", engine.ErrInvalidValue, codes.InvalidArgument},
	{"INVALID_WEIGHT", engine.ErrInvalidWeight, codes.InvalidArgument},
	{"INVALID_ACTION", engine.ErrInvalidAction, codes.InvalidArgument},
	{"INVALID_FLAGS", engine.ErrInvalidFlags, codes.InvalidArgument},
	{"CALLOUT_NOT_FOUND", engine.ErrCalloutNotFound, codes.NotFound},
	{"INCOMPATIBLE_LAYER", engine.ErrIncompatibleLayer, codes.InvalidArgument},
	{"INVALID_ARGUMENT", engine.ErrInvalidArgument, codes.InvalidArgument},
	{"TXN_IN_PROGRESS", engine.ErrTxnInProgress, codes.FailedPrecondition},
	{"NO_TXN_IN_PROGRESS", engine.ErrNoTxnInProgress, codes.FailedPrecondition},
	{"TXN_ABORTED", engine.ErrTxnAborted, codes.Aborted},
	// The proxy package's errors, for QueryRedirect.
	{"REDIRECT_ACCESS_DENIED", proxy.ErrAccessDenied, codes.PermissionDenied},
	{"REDIRECT_NOT_FOUND", proxy.ErrNotFound, codes.NotFound},
	{"REDIRECT_INVALID_ARGUMENT", proxy.ErrInvalidArgument, codes.InvalidArgument},
	{"REDIRECT_NOT_SUPPORTED", proxy.ErrNotSupported, codes.Unimplemented},
}

// ErrUnavailable means the daemon could not be reached.
var ErrUnavailable = errors.New("fwp: daemon unavailable")

// Status turns an error into a gRPC status whose ErrorInfo lists every
// typed error it matches, so that the client can rebuild an error that
// errors.Is all of them.
func Status(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok && !isTyped(err) {
		return err // already a status (e.g. from a stream)
	}
	code := codes.Unknown
	var reasons []string
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			if code == codes.Unknown {
				code = s.code
			}
			reasons = append(reasons, s.reason)
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case code == codes.Unknown && errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	st := status.New(code, err.Error())
	if len(reasons) > 0 {
		if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: reasons[0], Domain: errorDomain,
			Metadata: map[string]string{"all": strings.Join(reasons, ",")}}); derr == nil {
			st = d
		}
	}
	return st.Err()
}

func isTyped(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			return true
		}
	}
	return false
}

// Error is an error the daemon returned: its message, its gRPC code, and
// the typed errors it matches (errors.Is works with engine's and mgmt's
// sentinels).
type Error struct {
	Code codes.Code
	Msg  string
	errs []error
}

func (e *Error) Error() string   { return e.Msg }
func (e *Error) Unwrap() []error { return e.errs }

// GRPCStatus lets status.FromError see the original status.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Msg) }

// FromStatus rebuilds a typed error from a gRPC error. Statuses the daemon
// did not type (transport failures, the message size limit) map by code.
func FromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Msg: st.Message()}
	for _, d := range st.Details() {
		info, ok := d.(*errdetails.ErrorInfo)
		if !ok || info.Domain != errorDomain {
			continue
		}
		for _, r := range strings.Split(info.Metadata["all"], ",") {
			for _, s := range sentinels {
				if s.reason == r {
					e.errs = append(e.errs, s.err)
				}
			}
		}
	}
	if len(e.errs) == 0 {
		switch st.Code() {
		case codes.ResourceExhausted:
			e.errs = append(e.errs, mgmt.ErrTooLarge)
		case codes.PermissionDenied:
			e.errs = append(e.errs, mgmt.ErrAccessDenied)
		case codes.Unavailable:
			e.errs = append(e.errs, ErrUnavailable)
		case codes.Canceled:
			e.errs = append(e.errs, context.Canceled)
		case codes.DeadlineExceeded:
			e.errs = append(e.errs, context.DeadlineExceeded)
		}
	}
	return e
}
