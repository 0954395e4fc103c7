package mgmt

import (
	"fmt"
	"strings"

	"fwp/engine"
)

// Warnings returns what in ops is legal but almost surely a mistake, each
// naming the object by key (and position, for a policy file). Apply
// returns them with its result; they change nothing.
func Warnings(ops []Op) []string {
	var out []string
	for _, op := range ops {
		if op.Add == nil || op.Add.Filter == nil {
			continue
		}
		f := op.Add.Filter
		layer := engine.LayerInvalid
		for _, c := range f.Conditions {
			// Only remote port conditions can warn: the others are not
			// parsed again (a million filters in one Apply).
			if fi, ok := engine.FieldByName(strings.TrimSpace(c.Field)); !ok || fi != engine.FieldIPRemotePort {
				continue
			}
			if layer == engine.LayerInvalid {
				l, err := ParseLayer(f.Layer)
				if err != nil {
					break
				}
				layer = l
			}
			ec, err := ParseCondition(layer, c)
			if err != nil || ec.Field != engine.FieldIPRemotePort || !onlyZero(ec) {
				continue
			}
			w := fmt.Sprintf("filter %q: condition %s matches only remote port 0, which no connection or datagram has: "+
				"to match every port leave the condition out", f.Key, ec)
			if op.Pos != "" {
				w = op.Pos + ": " + w
			}
			out = append(out, w)
		}
	}
	return out
}

// onlyZero reports whether an integer condition matches the value 0 and
// nothing else.
func onlyZero(c engine.Condition) bool {
	if l := c.Value.List(); l != nil {
		return l.Len() == 1 && l.Contains(engine.Uint16(0))
	}
	switch c.Match {
	case engine.MatchEqual, engine.MatchLessOrEqual:
		return c.Value.Uint() == 0
	case engine.MatchLess:
		return c.Value.Uint() == 1
	case engine.MatchRange:
		return c.Value.High().Uint() == 0
	}
	return false
}
