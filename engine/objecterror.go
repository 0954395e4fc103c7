package engine

import (
	"fmt"
	"strconv"
)

// ObjectError is an error about one object, named by its kind, key and
// ID: the key is what the user wrote, the ID what the engine gave it
// (and, for an object of a refused transaction, nobody ever saw). The
// management layer adds where the object came from (file:line).
type ObjectError struct {
	Kind string // provider, provider_context, sublayer, callout, filter
	Key  string
	ID   uint64
	Err  error
}

func (e *ObjectError) Error() string {
	return Describe(e.Kind, e.Key, e.ID) + ": " + e.Err.Error()
}

func (e *ObjectError) Unwrap() error { return e.Err }

// Describe names an object as messages do: `filter "block-telnet" (#8)`.
func Describe(kind, key string, id uint64) string {
	if key == "" {
		return kind + " #" + strconv.FormatUint(id, 10)
	}
	return fmt.Sprintf("%s %q (#%d)", kind, key, id)
}

// FilterError is an ObjectError about filter f.
func FilterError(f *Filter, err error) *ObjectError {
	return &ObjectError{Kind: "filter", Key: f.Key, ID: uint64(f.ID), Err: err}
}

// Describe names the filter by key and ID.
func (f *Filter) Describe() string { return Describe("filter", f.Key, uint64(f.ID)) }
