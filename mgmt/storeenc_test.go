package mgmt

import (
	"bytes"
	"encoding/json"
	"net/netip"
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
