package mgmt

import (
	"encoding/json"
	"io"
	"strconv"
)

// The store's files are JSON, written by the encoders below rather than by
// encoding/json: a commit of a million filters spent ~2 s of CPU in
// encoding/json's reflection. The output is byte for byte what
// encoding/json writes for the same values (TestStoreEncodingMatchesJSON,
// FuzzStoreEncoding), so the format is unchanged: files written before
// load as they did, and encoding/json reads what these write. Anything off
// the fast path (kinds other than filters, packed lists, strings that need
// escaping) is handed to encoding/json itself. storedec.go reads it back.

// storeChange is one key's change in a commit: the object put, or nil for
// a removal.
type storeChange struct {
	k objKey
	o *Object
}

// encWriter appends JSON to a buffer and hands it to w in pieces, so a
// large record is never held whole.
type encWriter struct {
	w   io.Writer
	b   []byte
	n   int64
	err error
}

const encFlush = 1 << 20

func (e *encWriter) flushIfFull() {
	if len(e.b) >= encFlush {
		e.flush()
	}
}

func (e *encWriter) appendObject(o *Object) {
	var err error
	if e.b, err = appendObject(e.b, o); err != nil && e.err == nil {
		e.err = err
	}
	e.flushIfFull()
}

func (e *encWriter) flush() {
	if e.err == nil && len(e.b) > 0 {
		var n int
		n, e.err = e.w.Write(e.b)
		e.n += int64(n)
	}
	e.b = e.b[:0]
}

// writeRecord writes a journal line (with its newline): the puts, then the
// deletions of keys old holds, as encoding/json writes a journalRecord.
// It reports whether the record was empty (nothing written).
func (e *encWriter) writeRecord(old map[objKey]Object, changes []storeChange) (empty bool) {
	first := true
	for _, c := range changes {
		if c.o == nil {
			continue
		}
		if first {
			e.b = append(e.b, `{"put":[`...)
			first = false
		} else {
			e.b = append(e.b, ',')
		}
		e.appendObject(c.o)
	}
	hasPut := !first
	if hasPut {
		e.b = append(e.b, ']')
	}
	first = true
	for _, c := range changes {
		if c.o != nil {
			continue
		}
		if _, ok := old[c.k]; !ok {
			continue
		}
		switch {
		case first && hasPut:
			e.b = append(e.b, `,"del":[`...)
		case first:
			e.b = append(e.b, `{"del":[`...)
		default:
			e.b = append(e.b, ',')
		}
		first = false
		e.b = append(e.b, `{"kind":`...)
		e.b = appendJSONString(e.b, c.k.kind.String())
		e.b = append(e.b, `,"key":`...)
		e.b = appendJSONString(e.b, c.k.key)
		e.b = append(e.b, '}')
		e.flushIfFull()
	}
	if !hasPut && first {
		return true
	}
	if !first {
		e.b = append(e.b, ']')
	}
	e.b = append(e.b, "}\n"...)
	e.flush()
	return false
}

// writeSnapshot writes f as json.Encoder.Encode does (with a newline).
func (e *encWriter) writeSnapshot(f *storeFile) {
	e.b = append(e.b, `{"version":`...)
	e.b = strconv.AppendInt(e.b, int64(f.Version), 10)
	if f.Gen != 0 {
		e.b = append(e.b, `,"gen":`...)
		e.b = strconv.AppendUint(e.b, f.Gen, 10)
	}
	e.b = append(e.b, `,"objects":`...)
	if f.Objects == nil {
		e.b = append(e.b, "null"...)
	} else {
		e.b = append(e.b, '[')
		for i := range f.Objects {
			if i > 0 {
				e.b = append(e.b, ',')
			}
			e.appendObject(&f.Objects[i])
		}
		e.b = append(e.b, ']')
	}
	e.b = append(e.b, "}\n"...)
	e.flush()
}

// appendObject appends o as encoding/json writes it.
func appendObject(b []byte, o *Object) ([]byte, error) {
	f := o.Filter
	if f == nil || o.Provider != nil || o.ProviderContext != nil || o.Sublayer != nil || o.Callout != nil {
		return appendJSON(b, o)
	}
	for i := range f.Conditions {
		if f.Conditions[i].List != nil {
			return appendJSON(b, o)
		}
	}
	b = append(b, `{"filter":{"key":`...)
	b = appendJSONString(b, f.Key)
	b = appendStringField(b, `,"name":`, f.Name)
	b = appendStringField(b, `,"description":`, f.Description)
	b = append(b, `,"layer":`...)
	b = appendJSONString(b, f.Layer)
	b = appendStringField(b, `,"sublayer":`, f.Sublayer)
	b = appendStringField(b, `,"provider":`, f.Provider)
	b = appendStringField(b, `,"weight":`, f.Weight)
	if len(f.Conditions) > 0 {
		b = append(b, `,"conditions":[`...)
		for i := range f.Conditions {
			c := &f.Conditions[i]
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"field":`...)
			b = appendJSONString(b, c.Field)
			b = append(b, `,"match":`...)
			b = appendJSONString(b, c.Match)
			b = append(b, `,"value":`...)
			b = appendJSONString(b, c.Value)
			if len(c.Values) > 0 {
				b = appendStrings(b, `,"values":`, c.Values)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	b = append(b, `,"action":`...)
	b = appendJSONString(b, f.Action)
	b = appendStringField(b, `,"callout":`, f.Callout)
	b = appendStringField(b, `,"provider_context":`, f.ProviderContext)
	if len(f.Flags) > 0 {
		b = appendStrings(b, `,"flags":`, f.Flags)
	}
	if f.Lifetime != 0 {
		b = append(b, `,"lifetime":`...)
		b = appendJSONString(b, f.Lifetime.String())
	}
	b = appendUintField(b, `,"id":`, f.ID)
	b = appendUintField(b, `,"effective_weight":`, f.EffectiveWeight)
	b = appendUintField(b, `,"session":`, f.Session)
	return append(b, "}}"...), nil
}

func appendStringField(b []byte, name, s string) []byte {
	if s == "" {
		return b
	}
	return appendJSONString(append(b, name...), s)
}

func appendUintField(b []byte, name string, v uint64) []byte {
	if v == 0 {
		return b
	}
	return strconv.AppendUint(append(b, name...), v, 10)
}

func appendStrings(b []byte, name string, ss []string) []byte {
	b = append(append(b, name...), '[')
	for i, s := range ss {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, s)
	}
	return append(b, ']')
}

// appendJSONString appends s quoted: printable ASCII other than the
// characters encoding/json escapes (quote, backslash, and <, > and & as it
// escapes HTML) as is; any other string as encoding/json writes it.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ = appendJSON(b, s) // a string always encodes
			return b
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// appendJSON appends v as encoding/json writes it.
func appendJSON(b []byte, v any) ([]byte, error) {
	j, err := json.Marshal(v)
	return append(b, j...), err
}
