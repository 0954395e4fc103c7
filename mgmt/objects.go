package mgmt

import (
	"fmt"
	"strconv"
	"strings"

	"fwp/engine"
)

// Lifetime is how long an object lives.
type Lifetime uint8

const (
	// LifetimeDefault is dynamic in a dynamic session and static otherwise.
	LifetimeDefault Lifetime = iota
	LifetimeDynamic
	LifetimeStatic
	LifetimePersistent
	LifetimeBootTime
)

var lifetimeNames = [...]string{"", "dynamic", "static", "persistent", "boottime"}

func (l Lifetime) String() string {
	if int(l) < len(lifetimeNames) {
		return lifetimeNames[l]
	}
	return "lifetime(" + strconv.Itoa(int(l)) + ")"
}

// ParseLifetime reads a lifetime name ("" is the default).
func ParseLifetime(s string) (Lifetime, error) {
	n := strings.ReplaceAll(strings.ReplaceAll(strings.ToLower(strings.TrimSpace(s)), "-", ""), "_", "")
	for i, name := range lifetimeNames {
		if n == name {
			return Lifetime(i), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown lifetime %q (dynamic, static, persistent, boottime)", engine.ErrInvalidArgument, s)
}

// MarshalText and UnmarshalText store a lifetime by name.
func (l Lifetime) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

func (l *Lifetime) UnmarshalText(b []byte) error {
	v, err := ParseLifetime(string(b))
	*l = v
	return err
}

// durable reports whether the lifetime is kept in the store.
func (l Lifetime) durable() bool { return l == LifetimePersistent || l == LifetimeBootTime }

// mayReference reports whether an object of lifetime l may reference one
// of lifetime to: never a shorter one, and boot-time objects only among
// themselves (they are gone once the persistent policy is loaded, and at
// boot nothing else exists yet).
func (l Lifetime) mayReference(to Lifetime) bool {
	if l == LifetimeBootTime || to == LifetimeBootTime {
		return l == to
	}
	return to >= l
}

// Kind is an object kind.
type Kind uint8

const (
	KindProvider Kind = iota + 1
	KindProviderContext
	KindSublayer
	KindCallout
	KindFilter
	numKinds
)

var kindNames = [...]string{"", "provider", "provider_context", "sublayer", "callout", "filter"}

func (k Kind) String() string {
	if k > 0 && k < numKinds {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Kinds lists every object kind, in dependency order (referenced first).
func Kinds() []Kind {
	return []Kind{KindProvider, KindProviderContext, KindSublayer, KindCallout, KindFilter}
}

// ParseKind reads a kind name; "context" is short for provider_context.
func ParseKind(s string) (Kind, error) {
	n := strings.ReplaceAll(strings.ToLower(strings.TrimSpace(s)), "-", "_")
	if n == "context" || n == "providercontext" {
		return KindProviderContext, nil
	}
	for k := KindProvider; k < numKinds; k++ {
		if kindNames[k] == n || kindNames[k]+"s" == n {
			return k, nil
		}
	}
	return 0, fmt.Errorf("%w: unknown object kind %q", engine.ErrInvalidArgument, s)
}

// MarshalText and UnmarshalText store a kind by name.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

func (k *Kind) UnmarshalText(b []byte) error {
	v, err := ParseKind(string(b))
	*k = v
	return err
}

// The object types below are what a client adds and reads. References are
// by key. ID, Session and EffectiveWeight are set by the manager and
// ignored on add.

// Provider is a provider (FWPM_PROVIDER0).
type Provider struct {
	Key         string   `json:"key"`
	Name        string   `json:"name,omitempty"`
	Description string   `json:"description,omitempty"`
	Lifetime    Lifetime `json:"lifetime,omitempty"`
	ID          uint32   `json:"id,omitempty"`
	Session     uint64   `json:"session,omitempty"`
}

// ProviderContext is a provider context (FWPM_PROVIDER_CONTEXT0).
type ProviderContext struct {
	Key      string   `json:"key"`
	Name     string   `json:"name,omitempty"`
	Provider string   `json:"provider,omitempty"`
	Data     []byte   `json:"data,omitempty"`
	Lifetime Lifetime `json:"lifetime,omitempty"`
	ID       uint64   `json:"id,omitempty"`
	Session  uint64   `json:"session,omitempty"`
	// DataRedacted: Data was withheld from a caller who may list the
	// policy but not read its secrets (fwpd's reader role); DataLength
	// and DataSHA256 describe it. Such a copy cannot be added back.
	DataRedacted bool   `json:"data_redacted,omitempty"`
	DataLength   int    `json:"data_length,omitempty"`
	DataSHA256   string `json:"data_sha256,omitempty"` // hex
}

// Sublayer is a sublayer (FWPM_SUBLAYER0).
type Sublayer struct {
	Key      string   `json:"key"`
	Name     string   `json:"name,omitempty"`
	Provider string   `json:"provider,omitempty"`
	Weight   uint16   `json:"weight"`
	Lifetime Lifetime `json:"lifetime,omitempty"`
	ID       uint32   `json:"id,omitempty"`
	Session  uint64   `json:"session,omitempty"`
}

// Callout is a callout's management object (FWPM_CALLOUT0).
type Callout struct {
	Key      string   `json:"key"`
	Name     string   `json:"name,omitempty"`
	Provider string   `json:"provider,omitempty"`
	Layer    string   `json:"layer"`
	Flags    []string `json:"flags,omitempty"` // conditional_on_flow, uses_provider_context
	Lifetime Lifetime `json:"lifetime,omitempty"`
	ID       uint32   `json:"id,omitempty"`
	Session  uint64   `json:"session,omitempty"`
}

// Condition is a filter condition; Value is read by engine.ParseValue for
// the field's type.
//
// Values, when set instead of Value, is a list, which WFP holds as one
// condition per value on the field, ORed. An EQUAL list on an address or
// integer field becomes one engine condition holding an engine.List (a
// blocklist of a million addresses is one condition of a few bytes per
// address); on other fields or with another match, one engine condition
// per value. MaxListValues bounds it.
//
// List, when set instead of Value and Values, is such a list already
// built (EQUAL only): the compact form the API and the store carry (JSON:
// base64 of engine.List's binary form).
type Condition struct {
	Field  string       `json:"field"`
	Match  string       `json:"match"`
	Value  string       `json:"value"`
	Values []string     `json:"values,omitempty"`
	List   *engine.List `json:"list,omitempty"`
}

// MaxListValues bounds the values of one list condition.
const MaxListValues = engine.MaxListValues

// Listable reports whether a list of values on the field with this match
// is held as one engine.List condition: EQUAL on an address or integer
// field.
func Listable(f engine.FieldID, match string) bool {
	m := strings.TrimSpace(match)
	if m != "" {
		mt, ok := engine.MatchTypeByName(m)
		if !ok || mt != engine.MatchEqual {
			return false
		}
	}
	t := f.Type()
	return t == engine.TypeAddr || t == engine.TypeUint8 || t == engine.TypeUint16 || t == engine.TypeUint32 || t == engine.TypeUint64
}

// Filter is a filter (FWPM_FILTER0).
type Filter struct {
	Key             string      `json:"key"`
	Name            string      `json:"name,omitempty"`
	Description     string      `json:"description,omitempty"`
	Layer           string      `json:"layer"`
	Sublayer        string      `json:"sublayer,omitempty"` // "" is the universal sublayer
	Provider        string      `json:"provider,omitempty"`
	Weight          string      `json:"weight,omitempty"` // auto, index:N or N
	Conditions      []Condition `json:"conditions,omitempty"`
	Action          string      `json:"action"`
	Callout         string      `json:"callout,omitempty"`
	ProviderContext string      `json:"provider_context,omitempty"`
	Flags           []string    `json:"flags,omitempty"` // clear_action_right, permit_if_callout_unregistered, disabled, indexed
	Lifetime        Lifetime    `json:"lifetime,omitempty"`
	ID              uint64      `json:"id,omitempty"`
	EffectiveWeight uint64      `json:"effective_weight,omitempty"`
	Session         uint64      `json:"session,omitempty"`
}

// Object holds exactly one object of any kind.
type Object struct {
	Provider        *Provider        `json:"provider,omitempty"`
	ProviderContext *ProviderContext `json:"provider_context,omitempty"`
	Sublayer        *Sublayer        `json:"sublayer,omitempty"`
	Callout         *Callout         `json:"callout,omitempty"`
	Filter          *Filter          `json:"filter,omitempty"`
}

// Kind returns the kind of the object held (0 when empty).
func (o Object) Kind() Kind {
	switch {
	case o.Provider != nil:
		return KindProvider
	case o.ProviderContext != nil:
		return KindProviderContext
	case o.Sublayer != nil:
		return KindSublayer
	case o.Callout != nil:
		return KindCallout
	case o.Filter != nil:
		return KindFilter
	}
	return 0
}

// head returns pointers to the fields every kind has (nil when empty).
func (o Object) head() (key *string, l *Lifetime) {
	switch o.Kind() {
	case KindProvider:
		return &o.Provider.Key, &o.Provider.Lifetime
	case KindProviderContext:
		return &o.ProviderContext.Key, &o.ProviderContext.Lifetime
	case KindSublayer:
		return &o.Sublayer.Key, &o.Sublayer.Lifetime
	case KindCallout:
		return &o.Callout.Key, &o.Callout.Lifetime
	case KindFilter:
		return &o.Filter.Key, &o.Filter.Lifetime
	}
	return nil, nil
}

// Key returns the held object's key.
func (o Object) Key() string {
	if k, _ := o.head(); k != nil {
		return *k
	}
	return ""
}

func (o Object) lifetime() Lifetime {
	if _, l := o.head(); l != nil {
		return *l
	}
	return 0
}

// refs lists the objects o references by key.
func (o Object) refs() []objKey {
	var out []objKey
	add := func(k Kind, key string) {
		if key != "" {
			out = append(out, objKey{k, key})
		}
	}
	switch o.Kind() {
	case KindProviderContext:
		add(KindProvider, o.ProviderContext.Provider)
	case KindSublayer:
		add(KindProvider, o.Sublayer.Provider)
	case KindCallout:
		add(KindProvider, o.Callout.Provider)
	case KindFilter:
		f := o.Filter
		add(KindProvider, f.Provider)
		add(KindSublayer, f.Sublayer)
		add(KindCallout, f.Callout)
		add(KindProviderContext, f.ProviderContext)
	}
	return out
}

// stored returns a copy fit for the store: runtime fields cleared.
func (o Object) stored(l Lifetime) Object {
	switch o.Kind() {
	case KindProvider:
		c := *o.Provider
		c.ID, c.Session, c.Lifetime = 0, 0, l
		return Object{Provider: &c}
	case KindProviderContext:
		c := *o.ProviderContext
		c.ID, c.Session, c.Lifetime = 0, 0, l
		return Object{ProviderContext: &c}
	case KindSublayer:
		c := *o.Sublayer
		c.ID, c.Session, c.Lifetime = 0, 0, l
		return Object{Sublayer: &c}
	case KindCallout:
		c := *o.Callout
		c.ID, c.Session, c.Lifetime = 0, 0, l
		return Object{Callout: &c}
	case KindFilter:
		c := *o.Filter
		c.ID, c.Session, c.EffectiveWeight, c.Lifetime = 0, 0, 0, l
		return Object{Filter: &c}
	}
	return o
}

// Ref names an object by kind and key, or by ID when Key is empty.
type Ref struct {
	Kind Kind   `json:"kind"`
	Key  string `json:"key,omitempty"`
	ID   uint64 `json:"id,omitempty"`
}

func (r Ref) String() string {
	if r.Key != "" {
		return r.Kind.String() + " " + strconv.Quote(r.Key)
	}
	return r.Kind.String() + " #" + strconv.FormatUint(r.ID, 10)
}

// Op is one step of Apply: an add or a delete. Pos says where it came from
// (a policy file's "file:line"), and prefixes its error.
type Op struct {
	Pos    string
	Add    *Object
	Delete *Ref
}

// ParseWeight reads a filter weight: "" or auto, index:N (0–15), or a number.
func ParseWeight(s string) (engine.Weight, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	switch {
	case s == "" || s == "auto":
		return engine.WeightAuto(), nil
	case strings.HasPrefix(s, "index:"):
		n, err := strconv.ParseUint(strings.TrimSpace(s[len("index:"):]), 10, 8)
		if err != nil || n > 15 {
			return engine.Weight{}, fmt.Errorf("%w: %q: the range index is 0..15", engine.ErrInvalidWeight, s)
		}
		return engine.WeightIndex(uint8(n)), nil
	}
	n, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		return engine.Weight{}, fmt.Errorf("%w: %q is not auto, index:N or a 64-bit number", engine.ErrInvalidWeight, s)
	}
	return engine.WeightExact(n), nil
}

type flagName[F ~uint32] struct {
	name string
	flag F
}

var filterFlagNames = []flagName[engine.FilterFlags]{
	{"clear_action_right", engine.FilterClearActionRight},
	{"permit_if_callout_unregistered", engine.FilterPermitIfCalloutUnregistered},
	{"disabled", engine.FilterDisabled},
	{"indexed", engine.FilterIndexed},
}

var calloutFlagNames = []flagName[engine.CalloutFlags]{
	{"conditional_on_flow", engine.CalloutConditionalOnFlow},
	{"uses_provider_context", engine.CalloutUsesProviderContext},
}

func parseFlags[F ~uint32](table []flagName[F], what string, names []string) (F, error) {
	var f F
next:
	for _, n := range names {
		n = strings.ToLower(strings.TrimSpace(n))
		for _, x := range table {
			if n == x.name {
				f |= x.flag
				continue next
			}
		}
		return 0, fmt.Errorf("%w: unknown %s flag %q", engine.ErrInvalidFlags, what, n)
	}
	return f, nil
}

func flagNames[F ~uint32](table []flagName[F], f F) []string {
	var out []string
	for _, x := range table {
		if f&x.flag != 0 {
			out = append(out, x.name)
		}
	}
	return out
}

// ParseFilterFlags reads filter flag names.
func ParseFilterFlags(names []string) (engine.FilterFlags, error) {
	return parseFlags(filterFlagNames, "filter", names)
}

// FilterFlagNames renders filter flags as names.
func FilterFlagNames(f engine.FilterFlags) []string { return flagNames(filterFlagNames, f) }

// ParseCalloutFlags reads callout flag names.
func ParseCalloutFlags(names []string) (engine.CalloutFlags, error) {
	return parseFlags(calloutFlagNames, "callout", names)
}

// CalloutFlagNames renders callout flags as names.
func CalloutFlagNames(f engine.CalloutFlags) []string { return flagNames(calloutFlagNames, f) }

// ParseLayer finds a layer by name.
func ParseLayer(name string) (engine.LayerID, error) {
	l, ok := engine.LayerByName(strings.TrimSpace(name))
	if !ok {
		return 0, fmt.Errorf("%w: unknown layer %q", engine.ErrInvalidLayer, name)
	}
	return l, nil
}

// ParseCondition reads a condition for a layer: the field must be in the
// layer, the match type known and the value of the field's type.
func ParseCondition(layer engine.LayerID, c Condition) (engine.Condition, error) {
	f, ok := engine.FieldByName(strings.TrimSpace(c.Field))
	if !ok {
		return engine.Condition{}, fmt.Errorf("%w: unknown field %q", engine.ErrInvalidField, c.Field)
	}
	if l := engine.LayerByID(layer); l != nil && !l.HasField(f) {
		return engine.Condition{}, fmt.Errorf("%w: field %s is not in layer %s", engine.ErrInvalidField, f, l.Name)
	}
	match := c.Match
	if strings.TrimSpace(match) == "" {
		match = "equal"
	}
	m, ok := engine.MatchTypeByName(strings.TrimSpace(match))
	if !ok {
		return engine.Condition{}, fmt.Errorf("%w: unknown match type %q", engine.ErrInvalidMatchType, c.Match)
	}
	if c.List != nil {
		if c.Value != "" || len(c.Values) > 0 {
			return engine.Condition{}, fmt.Errorf("%w: field %s: a list and a value both set", engine.ErrInvalidCondition, f)
		}
		return engine.Condition{Field: f, Match: m, Value: engine.ListValue(c.List)}, nil
	}
	v, err := engine.ParseValue(f.Type(), c.Value)
	if err != nil {
		return engine.Condition{}, fmt.Errorf("field %s: %w", f, err)
	}
	return engine.Condition{Field: f, Match: m, Value: v}, nil
}

// ParseValues reads field=value pairs for a layer into engine values, for
// Explain.
func ParseValues(layer engine.LayerID, kv map[string]string) (*engine.Values, error) {
	l := engine.LayerByID(layer)
	if l == nil {
		return nil, fmt.Errorf("%w: %d", engine.ErrInvalidLayer, layer)
	}
	vs := &engine.Values{}
	for name, s := range kv {
		f, ok := engine.FieldByName(name)
		if !ok {
			return nil, fmt.Errorf("%w: unknown field %q", engine.ErrInvalidField, name)
		}
		if !l.HasField(f) {
			return nil, fmt.Errorf("%w: field %s is not in layer %s", engine.ErrInvalidField, f, l.Name)
		}
		v, err := engine.ParseValue(f.Type(), s)
		if err != nil {
			return nil, fmt.Errorf("field %s: %w", f, err)
		}
		if v.Type() != f.Type() {
			return nil, fmt.Errorf("%w: field %s takes a single %s, not %q", engine.ErrTypeMismatch, f, f.Type(), s)
		}
		vs.Set(f, v)
	}
	return vs, nil
}
