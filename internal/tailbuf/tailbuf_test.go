package tailbuf

import (
	"io"
	"strings"
	"sync"
	"testing"
)

var _ io.Writer = (*Buffer)(nil)

func TestKeepsTheLastBytes(t *testing.T) {
	for _, tc := range []struct {
		max    int
		writes []string
		want   string
	}{
		{max: 8, writes: nil, want: ""},
		{max: 8, writes: []string{"abc"}, want: "abc"},
		{max: 8, writes: []string{"abcd", "efgh"}, want: "abcdefgh"},
		{max: 8, writes: []string{"abcd", "efgh", "ij"}, want: "cdefghij"},
		{max: 4, writes: []string{"0123456789"}, want: "6789"},
		{max: 0, writes: []string{"abc"}, want: ""},
	} {
		b := New(tc.max)
		for _, w := range tc.writes {
			n, err := b.Write([]byte(w))
			if n != len(w) || err != nil {
				t.Fatalf("max %d: Write(%q) = %d, %v; want %d, nil", tc.max, w, n, err, len(w))
			}
		}
		if got := b.String(); got != tc.want {
			t.Errorf("max %d, writes %q: String() = %q, want %q", tc.max, tc.writes, got, tc.want)
		}
	}
}

func TestConcurrentWriters(t *testing.T) {
	b := New(64)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				b.Write([]byte("xxxxxxxxxx"))
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	if got := b.String(); got != strings.Repeat("x", 64) {
		t.Fatalf("String() = %q, want 64 x", got)
	}
}
