package mgmt

import (
	"bytes"
	"strconv"
	"unicode/utf8"
)

// fastDecoder reads the store's JSON as the store's encoder writes it
// (storeenc.go): a restart of fwpd with a million filters in its journal
// spent ~5 s of CPU in encoding/json's reflection. It accepts only a
// strict subset of JSON — filters whose fields come in the encoder's order,
// no whitespace, strings without escapes, no packed lists, no other kind —
// and reports false for anything else, which the caller then hands to
// encoding/json: the result, and every error, are encoding/json's
// (FuzzStoreDecoding checks that whatever it accepts, encoding/json
// decodes to the same value).
type fastDecoder struct {
	b   []byte
	i   int
	bad bool
	// last shares a string equal to the previous one read in the same
	// field (layer, action, weight, a condition's field and match).
	last [5]string
}

// decodeRecordFast decodes one journal line (without its newline).
func decodeRecordFast(line []byte) (journalRecord, bool) {
	d := &fastDecoder{b: line}
	var rec journalRecord
	d.lit(`{`)
	del := d.peek(`"del":[`)
	if d.peek(`"put":[`) {
		d.lit(`"put":[`)
		rec.Put = d.objects()
		if del = d.peek(`,`); del {
			d.lit(`,`)
		}
	}
	if del {
		d.lit(`"del":[`)
		for !d.bad {
			d.lit(`{"kind":`)
			var r storedRef
			if err := r.Kind.UnmarshalText(d.str()); err != nil {
				d.bad = true
			}
			d.lit(`,"key":`)
			r.Key = string(d.str())
			d.lit(`}`)
			rec.Del = append(rec.Del, r)
			if !d.peek(`,`) {
				break
			}
			d.lit(`,`)
		}
		d.lit(`]`)
	}
	d.lit(`}`)
	if d.bad || d.i != len(d.b) || (rec.Put == nil && rec.Del == nil && len(line) != 2) {
		return journalRecord{}, false
	}
	return rec, true
}

// decodeSnapshotFast decodes the snapshot file.
func decodeSnapshotFast(b []byte) (storeFile, bool) {
	d := &fastDecoder{b: bytes.TrimSuffix(b, []byte("\n"))}
	var f storeFile
	d.lit(`{"version":`)
	v := d.uint()
	if v > 1<<31 {
		d.bad = true
	}
	f.Version = int(v)
	if d.peek(`,"gen":`) {
		d.lit(`,"gen":`)
		f.Gen = d.uint()
	}
	d.lit(`,"objects":[`)
	f.Objects = d.objects()
	d.lit(`}`)
	if d.bad || d.i != len(d.b) {
		return storeFile{}, false
	}
	return f, true
}

// objects reads objects up to and including the closing bracket.
func (d *fastDecoder) objects() []Object {
	var out []Object
	var slab []Filter
	for !d.bad {
		if len(slab) == cap(slab) {
			slab = make([]Filter, 0, 256)
		}
		slab = append(slab, Filter{})
		f := &slab[len(slab)-1]
		d.lit(`{"filter":{`)
		d.filter(f)
		d.lit(`}}`)
		out = append(out, Object{Filter: f})
		if !d.peek(`,`) {
			break
		}
		d.lit(`,`)
	}
	d.lit(`]`)
	return out
}

// filterFields is the order the encoder writes a filter's fields in.
var filterFields = [...]string{"key", "name", "description", "layer", "sublayer", "provider", "weight", "conditions",
	"action", "callout", "provider_context", "flags", "lifetime", "id", "effective_weight", "session"}

func (d *fastDecoder) filter(f *Filter) {
	next := 0
	for first := true; !d.bad && !d.peek(`}`); first = false {
		if !first {
			d.lit(`,`)
		}
		name := d.str()
		d.lit(`:`)
		i := next
		for i < len(filterFields) && filterFields[i] != string(name) {
			i++
		}
		if i == len(filterFields) {
			d.bad = true
			return
		}
		next = i + 1
		switch filterFields[i] {
		case "key":
			f.Key = string(d.str())
		case "name":
			f.Name = string(d.str())
		case "description":
			f.Description = string(d.str())
		case "layer":
			f.Layer = d.shared(0)
		case "sublayer":
			f.Sublayer = string(d.str())
		case "provider":
			f.Provider = string(d.str())
		case "weight":
			f.Weight = d.shared(2)
		case "conditions":
			f.Conditions = d.conditions()
		case "action":
			f.Action = d.shared(1)
		case "callout":
			f.Callout = string(d.str())
		case "provider_context":
			f.ProviderContext = string(d.str())
		case "flags":
			f.Flags = d.strings()
		case "lifetime":
			if err := f.Lifetime.UnmarshalText(d.str()); err != nil {
				d.bad = true
			}
		case "id":
			f.ID = d.uint()
		case "effective_weight":
			f.EffectiveWeight = d.uint()
		case "session":
			f.Session = d.uint()
		}
	}
}

func (d *fastDecoder) conditions() []Condition {
	d.lit(`[`)
	var out []Condition
	for !d.bad {
		var c Condition
		d.lit(`{"field":`)
		c.Field = d.shared(3)
		d.lit(`,"match":`)
		c.Match = d.shared(4)
		d.lit(`,"value":`)
		c.Value = string(d.str())
		if d.peek(`,"values":`) {
			d.lit(`,"values":`)
			c.Values = d.strings()
		}
		d.lit(`}`)
		out = append(out, c)
		if !d.peek(`,`) {
			break
		}
		d.lit(`,`)
	}
	d.lit(`]`)
	return out
}

// strings reads a non-empty array of strings.
func (d *fastDecoder) strings() []string {
	d.lit(`[`)
	var out []string
	for !d.bad {
		out = append(out, string(d.str()))
		if !d.peek(`,`) {
			break
		}
		d.lit(`,`)
	}
	d.lit(`]`)
	return out
}

func (d *fastDecoder) peek(s string) bool {
	return !d.bad && bytes.HasPrefix(d.b[d.i:], []byte(s))
}

// lit consumes s, or marks the input bad.
func (d *fastDecoder) lit(s string) {
	if !d.peek(s) {
		d.bad = true
		return
	}
	d.i += len(s)
}

// str reads a string without escapes or control characters, in valid
// UTF-8 (which encoding/json decodes to itself).
func (d *fastDecoder) str() []byte {
	if !d.peek(`"`) {
		d.bad = true
		return nil
	}
	start, ascii := d.i+1, true
	for j := start; j < len(d.b); j++ {
		switch c := d.b[j]; {
		case c == '"':
			d.i = j + 1
			s := d.b[start:j]
			if !ascii && !utf8.Valid(s) {
				d.bad = true
			}
			return s
		case c == '\\' || c < 0x20:
			d.bad = true
			return nil
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	d.bad = true
	return nil
}

// shared reads a string, sharing the copy of the previous one read in the
// same field when equal.
func (d *fastDecoder) shared(field int) string {
	b := d.str()
	if string(b) == d.last[field] {
		return d.last[field]
	}
	s := string(b)
	d.last[field] = s
	return s
}

// uint reads a decimal number as encoding/json would into a uint64 (no
// sign, fraction, exponent or leading zero; in range).
func (d *fastDecoder) uint() uint64 {
	j := d.i
	for j < len(d.b) && d.b[j] >= '0' && d.b[j] <= '9' {
		j++
	}
	s := d.b[d.i:j]
	if len(s) == 0 || len(s) > 1 && s[0] == '0' {
		d.bad = true
		return 0
	}
	v, err := strconv.ParseUint(string(s), 10, 64)
	if err != nil {
		d.bad = true
	}
	d.i = j
	return v
}
