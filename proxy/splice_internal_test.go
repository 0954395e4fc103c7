package proxy

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// scriptReader answers each Read with the next scripted length (a full
// buffer when the script says -1), and records the buffer sizes offered.
type scriptReader struct {
	script []int
	sizes  []int
	sent   int
}

func (r *scriptReader) Read(p []byte) (int, error) {
	r.sizes = append(r.sizes, len(p))
	if len(r.script) == 0 {
		return 0, io.EOF
	}
	n := r.script[0]
	r.script = r.script[1:]
	if n < 0 || n > len(p) {
		n = len(p)
	}
	for i := range p[:n] {
		p[i] = byte(r.sent + i)
	}
	r.sent += n
	return n, nil
}

func TestRelayBufferGrowsForBulkAndShrinksWhenIdle(t *testing.T) {
	full := -1
	r := &scriptReader{script: []int{full, full, full, full, full, full, full, full, full, 100, 5000, full}}
	var out bytes.Buffer
	n, err := relay(&out, r)
	if err != nil || n != int64(r.sent) || out.Len() != r.sent {
		t.Fatalf("relay: %d bytes of %d, %v", n, r.sent, err)
	}
	for i, b := range out.Bytes() {
		if b != byte(i) {
			t.Fatalf("byte %d = %d: reordered or corrupted", i, b)
		}
	}
	k := 1024
	want := []int{32 * k, 64 * k, 128 * k, 256 * k, 512 * k, 1024 * k, 2048 * k, 4096 * k, 4096 * k, 4096 * k, 32 * k, 32 * k, 64 * k}
	if len(r.sizes) != len(want) {
		t.Fatalf("reads offered %v, want %v", r.sizes, want)
	}
	for i := range want {
		if r.sizes[i] != want[i] {
			t.Fatalf("read %d offered %d bytes, want %d (all: %v)", i, r.sizes[i], want[i], r.sizes)
		}
	}
}

type failWriter struct{ after int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.after <= 0 {
		return 0, errors.New("peer gone")
	}
	w.after--
	return len(p), nil
}

type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return len(p) / 2, nil }

func TestRelayWriteErrors(t *testing.T) {
	if n, err := relay(&failWriter{after: 1}, &scriptReader{script: []int{10, 10, 10}}); err == nil || n != 10 {
		t.Fatalf("failing writer: %d, %v", n, err)
	}
	if n, err := relay(shortWriter{}, &scriptReader{script: []int{10}}); !errors.Is(err, io.ErrShortWrite) || n != 5 {
		t.Fatalf("short writer: %d, %v", n, err)
	}
	readErr := errors.New("reset")
	if _, err := relay(io.Discard, io.MultiReader(bytes.NewReader([]byte("x")), errReader{readErr})); !errors.Is(err, readErr) {
		t.Fatalf("read error: %v", err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }
