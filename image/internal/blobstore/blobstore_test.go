package blobstore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"matchlock.dev/matchlock/image/internal/scratch"
)

func newStore(t *testing.T) (*Store, *scratch.Dir) {
	root := t.TempDir()
	tmp, err := scratch.New(filepath.Join(root, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(filepath.Join(root, "blobs"), tmp)
	if err != nil {
		t.Fatal(err)
	}
	return s, tmp
}

func TestPutVerifies(t *testing.T) {
	s, tmp := newStore(t)
	data := []byte("hello blob")
	want, _, _ := v1.SHA256(bytes.NewReader(data))
	wrong, _, _ := v1.SHA256(strings.NewReader("other"))

	for _, c := range []struct {
		name string
		want v1.Hash
		size int64
	}{
		{"wrong digest", wrong, int64(len(data))},
		{"short", want, int64(len(data)) + 1},
		{"long", want, int64(len(data)) - 1},
	} {
		if _, _, err := s.Put(bytes.NewReader(data), c.want, c.size); !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s: got %v, want ErrDigestMismatch", c.name, err)
		}
	}
	if _, ok := s.Has(want); ok {
		t.Fatal("a mismatched blob was stored")
	}
	if ents, _ := os.ReadDir(tmp.Path()); len(ents) != 0 {
		t.Fatalf("scratch files left: %v", ents)
	}
	got, n, err := s.Put(bytes.NewReader(data), want, int64(len(data)))
	if err != nil || got != want || n != int64(len(data)) {
		t.Fatalf("Put = %v %d %v", got, n, err)
	}
	if size, ok := s.Has(want); !ok || size != int64(len(data)) {
		t.Fatalf("Has = %d %v", size, ok)
	}
}

func TestConcurrentPutsStoreOnce(t *testing.T) {
	s, _ := newStore(t)
	data := bytes.Repeat([]byte("x"), 1<<20)
	want, _, _ := v1.SHA256(bytes.NewReader(data))
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := s.Put(bytes.NewReader(data), want, -1); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	n := 0
	s.Walk(func(h v1.Hash, size int64) error { n++; return nil })
	if n != 1 {
		t.Errorf("%d blobs, want 1", n)
	}
}

func TestRejectsBadDigests(t *testing.T) {
	s, _ := newStore(t)
	for _, h := range []v1.Hash{{Algorithm: "sha256", Hex: "../../etc/passwd"}, {Algorithm: "md5", Hex: "00"},
		{Algorithm: "sha256", Hex: strings.Repeat("G", 64)}} {
		if _, err := s.Open(h); err == nil {
			t.Errorf("Open(%v) worked", h)
		}
		if _, _, err := s.Put(strings.NewReader(""), h, -1); err == nil {
			t.Errorf("Put(%v) worked", h)
		}
	}
}
