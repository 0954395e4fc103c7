//go:build linux

package ebpf

import (
	"errors"

	"fwp/engine"
)

// RegisterBuiltinCallouts registers, with the engine the policy v comes
// from, the Go counterpart of every built-in callout v names (connect and
// bind redirect) that is not registered yet, so that the engine's explain,
// counters and events give the decision the hooks give rather than take
// them for unregistered callouts (fail closed). Call it before a policy
// takes effect (fwpd does, in its commit hook); it is idempotent.
//
// The counterpart decides as the hooks do: with the ACTION_WRITE right it
// permits (the redirect is the callout's soft permit), without it it
// leaves the decision alone (the hooks stop at a hard permit before
// reaching the filter). It cannot see a proxy's redirect records, which
// only the hooks know, so it answers for connections that carry none. It
// has no side effects: explain calls it.
func RegisterBuiltinCallouts(e *engine.Engine, v engine.View) error {
	var errs []error
	for _, c := range v.Callouts(0, 0) {
		if !IsBuiltinConnectRedirect(c.Key) && !IsBuiltinBindRedirect(c.Key) {
			continue
		}
		err := e.RegisterCallout(c.Key, engine.CalloutRegistration{Classify: builtinClassify, Flags: engine.CalloutExplainable})
		if err != nil && !errors.Is(err, engine.ErrCalloutAlreadyRegistered) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func builtinClassify(_ *engine.ClassifyRequest, out *engine.ClassifyOut) {
	if out.CanWrite() {
		out.Action = engine.ActionPermit
	}
}
