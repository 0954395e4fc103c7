package mgmt

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"fwp/engine"
)

// encodeRecord is the store's journal line for changes over old.
func encodeRecord(t testing.TB, old map[objKey]Object, changes []storeChange) []byte {
	t.Helper()
	var buf bytes.Buffer
	e := &encWriter{w: &buf}
	if e.writeRecord(old, changes) {
		return nil
	}
	if e.err != nil {
		t.Fatal(e.err)
	}
	if e.n != int64(buf.Len()) {
		t.Fatalf("counted %d bytes, wrote %d", e.n, buf.Len())
	}
	return buf.Bytes()
}

// jsonRecord is what encoding/json writes for the same commit.
func jsonRecord(t testing.TB, old map[objKey]Object, changes []storeChange) []byte {
	t.Helper()
	var rec journalRecord
	for _, c := range changes {
		if c.o != nil {
			rec.Put = append(rec.Put, *c.o)
		} else if _, ok := old[c.k]; ok {
			rec.Del = append(rec.Del, storedRef{c.k.kind, c.k.key})
		}
	}
	if len(rec.Put) == 0 && len(rec.Del) == 0 {
		return nil
	}
	b, err := json.Marshal(&rec)
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

func storeTestObjects(t testing.TB, s string) []Object {
	b := engine.NewListBuilder(engine.TypeAddr, 2)
	for _, a := range []string{"10.0.0.1", "10.0.0.2"} {
		if err := b.Add(engine.Addr(netip.MustParseAddr(a))); err != nil {
			t.Fatal(err)
		}
	}
	return []Object{
		{Filter: &Filter{Key: "f" + s, Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Lifetime: LifetimePersistent}},
		{Filter: &Filter{Key: s, Name: s, Description: s, Layer: s, Sublayer: s, Provider: s, Weight: s,
			Conditions: []Condition{{Field: s, Match: s, Value: s}, {Field: "ip_remote_port", Values: []string{s, "80", ""}}, {}},
			Action:     s, Callout: s, ProviderContext: s, Flags: []string{s, "disabled"}, Lifetime: LifetimeBootTime,
			ID: 1<<64 - 1, EffectiveWeight: 7, Session: 3}},
		{Filter: &Filter{Key: s, Conditions: []Condition{}, Flags: []string{}, Lifetime: Lifetime(9)}},
		{Filter: &Filter{Key: "list", Conditions: []Condition{{Field: "ip_remote_address", Match: "equal", List: b.List()}}}},
		{Provider: &Provider{Key: s, Name: s, Lifetime: LifetimePersistent}},
		{ProviderContext: &ProviderContext{Key: s, Data: []byte(s), Lifetime: LifetimePersistent}},
		{Sublayer: &Sublayer{Key: s, Weight: 3, Lifetime: LifetimeBootTime}},
		{Callout: &Callout{Key: s, Layer: s, Flags: []string{s}, Lifetime: LifetimePersistent}},
		{},
	}
}

func checkStoreEncoding(t testing.TB, s string) {
	objs := storeTestObjects(t, s)
	old := map[objKey]Object{{KindFilter, s}: objs[0], {KindProvider, "p" + s}: objs[4]}
	var changes []storeChange
	for i := range objs {
		changes = append(changes, storeChange{k: objKey{KindFilter, s}, o: &objs[i]})
	}
	dels := []storeChange{{k: objKey{KindFilter, s}}, {k: objKey{KindFilter, "absent" + s}}, {k: objKey{KindProvider, "p" + s}}}
	for _, cs := range [][]storeChange{changes, dels, append(changes[:2:2], dels...), dels[1:2], nil} {
		got, want := encodeRecord(t, old, cs), jsonRecord(t, old, cs)
		if !bytes.Equal(got, want) {
			t.Fatalf("journal record for %q:\n got %s\nwant %s", s, got, want)
		}
	}
	for _, f := range []storeFile{{Version: storeVersion, Gen: 3, Objects: objs}, {Version: 1, Objects: []Object{}}, {}} {
		var got, want bytes.Buffer
		e := &encWriter{w: &got}
		e.writeSnapshot(&f)
		if e.err != nil {
			t.Fatal(e.err)
		}
		if err := json.NewEncoder(&want).Encode(&f); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), want.Bytes()) {
			t.Fatalf("snapshot for %q:\n got %s\nwant %s", s, got.Bytes(), want.Bytes())
		}
	}
}

// The store's encoders write what encoding/json writes, byte for byte, so
// the files' format is unchanged: plain strings, every character
// encoding/json escapes, invalid UTF-8, empty and absent fields, every
// kind, packed lists.
func TestStoreEncodingMatchesJSON(t *testing.T) {
	for _, s := range []string{"", "plain", "a\"b\\c", "<script>&", "a<b", "a>b", "a&b", "\x00\x01\b\f\n\r\t\x1f\x7f", "é ü 中", "\xff\xfe", "\u2028\u2029", "~ }{"} {
		checkStoreEncoding(t, s)
	}
}

// A record larger than the encoder's buffer goes out in pieces and is
// still one line of the same bytes.
func TestStoreEncodingLargeRecord(t *testing.T) {
	var changes []storeChange
	for i := range 20_000 {
		o := storeTestObjects(t, "k"+string(rune('a'+i%26)))[1]
		o.Filter.Key = "key" + string(rune(i))
		changes = append(changes, storeChange{k: objKey{KindFilter, o.Filter.Key}, o: &o})
	}
	got, want := encodeRecord(t, nil, changes), jsonRecord(t, nil, changes)
	if len(got) < 2*encFlush || !bytes.Equal(got, want) {
		t.Fatalf("%d bytes, encoding/json %d; equal %v", len(got), len(want), bytes.Equal(got, want))
	}
}

// FuzzStoreEncoding: for any string in any field, the store's encoders
// write what encoding/json writes.
func FuzzStoreEncoding(f *testing.F) {
	for _, s := range []string{"", "x", "a\"<>&\\", "\x00\xff", "\u2028é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkStoreEncoding(t, s) })
}

// jsonDecodeRecord is the journal line as encoding/json reads it at load.
func jsonDecodeRecord(line []byte) (journalRecord, error) {
	var rec journalRecord
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return rec, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return rec, fmt.Errorf("more than one value")
	}
	return rec, nil
}

// checkStoreDecoding: whatever the fast decoders accept, encoding/json
// reads to the same value.
func checkStoreDecoding(t testing.TB, b []byte) (accepted bool) {
	if rec, ok := decodeRecordFast(b); ok {
		want, err := jsonDecodeRecord(append(slices.Clip(b), '\n'))
		if err != nil || !reflect.DeepEqual(rec, want) {
			t.Fatalf("record %q: fast %+v, encoding/json %+v (%v)", b, rec, want, err)
		}
		accepted = true
	}
	if f, ok := decodeSnapshotFast(b); ok {
		var want storeFile
		if err := json.Unmarshal(b, &want); err != nil || !reflect.DeepEqual(f, want) {
			t.Fatalf("snapshot %q: fast %+v, encoding/json %+v (%v)", b, f, want, err)
		}
		accepted = true
	}
	return accepted
}

func storeDecodingSeeds(t testing.TB) [][]byte {
	plain := Object{Filter: &Filter{Key: "h1", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "10", Lifetime: LifetimePersistent,
		Conditions: []Condition{{Field: "ip_remote_address", Match: "equal", Value: "10.0.0.1"}}}}
	full := Object{Filter: &Filter{Key: "k", Name: "n é", Description: "d", Layer: "l", Sublayer: "s", Provider: "p", Weight: "auto",
		Conditions: []Condition{{Field: "ip_remote_port", Value: "80", Values: []string{"1", "2"}}, {Field: "ip_protocol", Match: "equal", Value: "6"}},
		Action:     "permit", Callout: "c", ProviderContext: "pc", Flags: []string{"disabled", "indexed"}, Lifetime: LifetimeBootTime, ID: 7, EffectiveWeight: 1 << 63, Session: 2}}
	old := map[objKey]Object{{KindFilter, "gone"}: plain}
	var out [][]byte
	for _, cs := range [][]storeChange{
		{{k: objKey{KindFilter, "h1"}, o: &plain}},
		{{k: objKey{KindFilter, "h1"}, o: &plain}, {k: objKey{KindFilter, "k"}, o: &full}, {k: objKey{KindFilter, "gone"}}},
		{{k: objKey{KindFilter, "gone"}}},
	} {
		out = append(out, bytes.TrimSuffix(encodeRecord(t, old, cs), []byte("\n")))
	}
	var snap bytes.Buffer
	e := &encWriter{w: &snap}
	e.writeSnapshot(&storeFile{Version: storeVersion, Gen: 4, Objects: []Object{plain, full}})
	return append(out, snap.Bytes(), []byte(`{}`), []byte(`{"put":[{"filter":{}}]}`))
}

// The fast decoders read what the encoder writes (a large commit never
// falls back to encoding/json), to what encoding/json reads.
func TestStoreDecodingMatchesJSON(t *testing.T) {
	for _, b := range storeDecodingSeeds(t) {
		if !checkStoreDecoding(t, b) {
			t.Errorf("%s: not read by the fast decoders", b)
		}
	}
	// Off the fast path: encoding/json decides (and refuses or accepts).
	for _, s := range []string{`{"put":[{"filter":{"key":"a"}}]"del":[{"kind":"filter","key":"b"}]}`, `{"put":[]}`,
		`{"put":[{"filter":{"key":"a","key":"b"}}]}`, `{"put":[{"filter":{"KEY":"a"}}]}`, `{"put":[{"filter":{"id":01}}]}`,
		`{"put":[{"filter":{"key":"a\u0041"}}]}`, `{"put":[{"filter":{"key":"\xff"}}]}`, `{"put":[{"filter":{"id":18446744073709551616}}]}`,
		`{"put":[{"provider":{"key":"p"}}]}`, `{"del":[{"kind":"nope","key":"b"}]}`, `{"put":[{"filter":{"lifetime":"forever"}}]}`,
		`{"version":1,"objects":[]}`, `{"put":[{"filter":{"layer":"b","key":"a"}}]}`} {
		if checkStoreDecoding(t, []byte(s)) {
			t.Errorf("%s: read by the fast decoders", s)
		}
	}
}

// FuzzStoreDecoding: whatever the fast decoders accept, encoding/json
// reads to the same value.
func FuzzStoreDecoding(f *testing.F) {
	for _, b := range storeDecodingSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkStoreDecoding(t, b) })
}
