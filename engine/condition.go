package engine

import (
	"fmt"
	"strings"
)

// MatchType is how a condition compares its value with the field's
// (WFP's FWP_MATCH_TYPE).
type MatchType uint8

const (
	MatchEqual MatchType = iota
	MatchGreater
	MatchLess
	MatchGreaterOrEqual
	MatchLessOrEqual
	MatchRange
	MatchFlagsAllSet
	MatchFlagsAnySet
	MatchFlagsNoneSet
	MatchEqualCaseInsensitive
	MatchNotEqual
	MatchPrefix
	MatchNotPrefix
	numMatchTypes
)

var matchNames = [numMatchTypes]string{
	"equal", "greater", "less", "greater_or_equal", "less_or_equal", "range",
	"flags_all_set", "flags_any_set", "flags_none_set", "equal_case_insensitive",
	"not_equal", "prefix", "not_prefix",
}

func (m MatchType) String() string {
	if m < numMatchTypes {
		return matchNames[m]
	}
	return fmt.Sprintf("match(%d)", uint8(m))
}

// MatchTypeByName finds a match type by name (case-insensitive; the
// FWP_MATCH_ prefix is optional).
func MatchTypeByName(name string) (MatchType, bool) {
	n := strings.TrimPrefix(strings.ToLower(name), "fwp_match_")
	for m := MatchType(0); m < numMatchTypes; m++ {
		if matchNames[m] == n {
			return m, true
		}
	}
	return 0, false
}

// Condition is one filter condition (WFP's FWPM_FILTER_CONDITION0).
// Conditions on different fields are ANDed; on the same field, ORed.
type Condition struct {
	Field FieldID
	Match MatchType
	Value Value
}

func (c Condition) String() string {
	return c.Field.Name() + " " + c.Match.String() + " " + c.Value.String()
}

// validate checks c against the layer's schema. Every error wraps one of
// the package's sentinel errors.
func (c Condition) validate(l *Layer) error {
	if c.Field <= FieldInvalid || c.Field >= numFields {
		return fmt.Errorf("%w: unknown field %d", ErrInvalidCondition, c.Field)
	}
	if !l.HasField(c.Field) {
		return fmt.Errorf("%w: field %s is not in layer %s", ErrInvalidField, c.Field, l.Name)
	}
	if c.Match >= numMatchTypes {
		return fmt.Errorf("%w: unknown match type %d", ErrInvalidMatchType, c.Match)
	}
	ft := c.Field.Type()
	if !matchApplies(c.Match, ft) {
		return fmt.Errorf("%w: %s does not apply to field %s (%s)", ErrInvalidMatchType, c.Match, c.Field, ft)
	}
	vt := c.Value.t
	bad := func() error {
		return fmt.Errorf("%w: %s on field %s (%s) with a %s value", ErrTypeMismatch, c.Match, c.Field, ft, vt)
	}
	if vt == TypeList {
		return c.validateList(l)
	}
	switch c.Match {
	case MatchRange:
		if vt != TypeRange {
			return bad()
		}
		lo, hi := c.Value.r[0], c.Value.r[1]
		if lo.t != ft || hi.t != ft || !(ft.isInt() || ft == TypeAddr) {
			return bad()
		}
		if compare(lo, hi) > 0 {
			return fmt.Errorf("%w: range %s has its low end above its high end", ErrInvalidValue, c.Value)
		}
		if ft == TypeAddr && lo.ip.Is4() != hi.ip.Is4() {
			return fmt.Errorf("%w: range %s mixes address families", ErrInvalidValue, c.Value)
		}
	case MatchEqual, MatchNotEqual:
		switch {
		case vt == ft:
		case ft == TypeAddr && vt == TypePrefix:
		default:
			return bad()
		}
	case MatchGreater, MatchLess, MatchGreaterOrEqual, MatchLessOrEqual:
		if vt != ft || !(ft.isInt() || ft == TypeAddr) {
			return bad()
		}
	case MatchFlagsAllSet, MatchFlagsAnySet, MatchFlagsNoneSet:
		if vt != ft || !ft.isInt() {
			return bad()
		}
	case MatchEqualCaseInsensitive:
		if vt != ft || ft != TypeString {
			return bad()
		}
	case MatchPrefix, MatchNotPrefix:
		switch {
		case (ft == TypeString || ft == TypeBytes) && vt == ft:
		case ft == TypeAddr && vt == TypePrefix:
		default:
			return bad()
		}
	}
	if ft == TypeAddr {
		if err := c.checkFamily(l); err != nil {
			return err
		}
	}
	return nil
}

// validateList checks a list condition: EQUAL (the OR of EQUAL conditions
// WFP would hold), a list of the field's type, of the layer's family.
func (c Condition) validateList(l *Layer) error {
	ft, list := c.Field.Type(), c.Value.l
	if c.Match != MatchEqual {
		return fmt.Errorf("%w: a list condition on field %s matches with equal, not %s", ErrInvalidMatchType, c.Field, c.Match)
	}
	if list == nil || list.Len() == 0 {
		return fmt.Errorf("%w: the list on field %s has no values", ErrInvalidCondition, c.Field)
	}
	if list.typ != ft {
		return fmt.Errorf("%w: a list of %s on field %s (%s)", ErrTypeMismatch, list.typ, c.Field, ft)
	}
	if ft == TypeAddr && (l.V6 && list.Has4() || !l.V6 && list.Has6()) {
		fam := "v6"
		if l.V6 {
			fam = "v4"
		}
		return fmt.Errorf("%w: the list on field %s holds %s addresses, which do not belong on layer %s", ErrInvalidValue, c.Field, fam, l.Name)
	}
	return nil
}

// matchApplies reports whether a match type is defined for a field type at
// all (FWP_E_MATCH_TYPE_MISMATCH when not); the value's type is checked
// separately (FWP_E_TYPE_MISMATCH).
func matchApplies(m MatchType, ft Type) bool {
	switch m {
	case MatchGreater, MatchLess, MatchGreaterOrEqual, MatchLessOrEqual, MatchRange:
		return ft.isInt() || ft == TypeAddr
	case MatchFlagsAllSet, MatchFlagsAnySet, MatchFlagsNoneSet:
		return ft.isInt()
	case MatchEqualCaseInsensitive:
		return ft == TypeString
	case MatchPrefix, MatchNotPrefix:
		return ft == TypeString || ft == TypeBytes || ft == TypeAddr
	}
	return true
}

// checkFamily refuses a v6 address on a v4 layer and the reverse: such a
// condition could never match and is almost always a policy mistake.
func (c Condition) checkFamily(l *Layer) error {
	check := func(v Value) error {
		if v.t != TypeAddr && v.t != TypePrefix {
			return nil
		}
		if v.ip.Is4() == l.V6 {
			return fmt.Errorf("%w: address %s does not belong on layer %s", ErrInvalidValue, v, l.Name)
		}
		return nil
	}
	if c.Value.t == TypeRange {
		if err := check(c.Value.r[0]); err != nil {
			return err
		}
		return check(c.Value.r[1])
	}
	return check(c.Value)
}

// matches reports whether the incoming value v satisfies c. An empty
// incoming value never matches, whatever the match type.
func (c *Condition) matches(v Value) bool {
	if v.t == TypeEmpty {
		return false
	}
	cv := c.Value
	switch c.Match {
	case MatchEqual:
		return equalValue(cv, v)
	case MatchNotEqual:
		return !equalValue(cv, v)
	case MatchGreater:
		return compare(v, cv) > 0
	case MatchLess:
		return compare(v, cv) < 0
	case MatchGreaterOrEqual:
		return compare(v, cv) >= 0
	case MatchLessOrEqual:
		return compare(v, cv) <= 0
	case MatchRange:
		return compare(v, cv.r[0]) >= 0 && compare(v, cv.r[1]) <= 0
	case MatchFlagsAllSet:
		return v.n&cv.n == cv.n
	case MatchFlagsAnySet:
		return v.n&cv.n != 0
	case MatchFlagsNoneSet:
		return v.n&cv.n == 0
	case MatchEqualCaseInsensitive:
		return strings.EqualFold(v.s, cv.s)
	case MatchPrefix:
		return prefixMatch(cv, v)
	case MatchNotPrefix:
		return !prefixMatch(cv, v)
	}
	return false
}

func equalValue(cv, v Value) bool {
	if cv.t == TypeList {
		return cv.l.Contains(v)
	}
	if cv.t == TypePrefix {
		return prefixContains(cv, v)
	}
	if cv.t == TypeAddr {
		return cv.ip == v.ip
	}
	return cv.n == v.n && cv.s == v.s
}

func prefixMatch(cv, v Value) bool {
	if cv.t == TypePrefix {
		return prefixContains(cv, v)
	}
	return strings.HasPrefix(v.s, cv.s)
}

func prefixContains(cv, v Value) bool {
	if v.t != TypeAddr || cv.ip.Is4() != v.ip.Is4() {
		return false
	}
	p, err := v.ip.Prefix(int(cv.n))
	return err == nil && p.Addr() == cv.ip
}

// specificity scores how narrowly a condition matches, for automatic
// weights: more specific filters weigh more.
func (c Condition) specificity() uint64 {
	switch c.Match {
	case MatchNotEqual, MatchNotPrefix, MatchFlagsNoneSet:
		return 1
	case MatchGreater, MatchLess, MatchGreaterOrEqual, MatchLessOrEqual:
		return 2
	}
	v := c.Value
	switch v.t {
	case TypeList:
		return v.l.score // what its values would weigh as conditions
	case TypeAddr:
		return 128
	case TypePrefix:
		if v.ip.Is4() {
			return v.n * 4
		}
		return v.n
	case TypeRange:
		lo, hi := v.r[0], v.r[1]
		if lo.t == TypeAddr {
			return 16
		}
		width := hi.n - lo.n
		s := uint64(64)
		for width > 0 && s > 1 {
			width >>= 1
			s -= 4
		}
		return s
	case TypeString, TypeBytes:
		if c.Match == MatchPrefix {
			return 32
		}
		return 96
	}
	return 64
}
