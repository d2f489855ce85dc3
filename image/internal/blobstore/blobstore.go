// Package blobstore keeps content-addressed blobs: each file is named by the
// sha256 of its bytes (blobs/sha256/<hex>) and written by streaming into a
// scratch file while hashing, then renaming it into place only when the
// digest is the one expected. A blob is either complete and verified or
// absent; concurrent writers of one blob both succeed and leave one file.
package blobstore

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"matchlock.dev/matchlock/image/internal/scratch"
)

// ErrDigestMismatch: the bytes do not hash to the digest they were fetched
// or listed under, or are not the expected size.
var ErrDigestMismatch = errors.New("digest mismatch")

// Store is a directory of blobs. Safe for concurrent use by goroutines and
// processes.
type Store struct {
	dir string // holds sha256/
	tmp *scratch.Dir
}

// New opens (and creates) the blob directory dir; tmp must be on the same
// filesystem.
func New(dir string, tmp *scratch.Dir) (*Store, error) {
	if err := os.MkdirAll(filepath.Join(dir, "sha256"), 0o755); err != nil {
		return nil, err
	}
	return &Store{dir: dir, tmp: tmp}, nil
}

// Path is where the blob h is (or would be) stored.
func (s *Store) Path(h v1.Hash) string { return filepath.Join(s.dir, h.Algorithm, h.Hex) }

// Has reports whether blob h is present, and its size.
func (s *Store) Has(h v1.Hash) (int64, bool) {
	if check(h) != nil {
		return 0, false
	}
	fi, err := os.Stat(s.Path(h))
	if err != nil || !fi.Mode().IsRegular() {
		return 0, false
	}
	return fi.Size(), true
}

// Open opens blob h for reading.
func (s *Store) Open(h v1.Hash) (*os.File, error) {
	if err := check(h); err != nil {
		return nil, err
	}
	return os.Open(s.Path(h))
}

// Put stores the bytes of r. If want is set they must hash to it; if size is
// not negative there must be exactly that many, and no more are read. It
// returns the digest and size stored.
func (s *Store) Put(r io.Reader, want v1.Hash, size int64) (v1.Hash, int64, error) {
	if want != (v1.Hash{}) {
		if err := check(want); err != nil {
			return v1.Hash{}, 0, err
		}
	}
	f, err := s.tmp.Create("blob-*")
	if err != nil {
		return v1.Hash{}, 0, fmt.Errorf("create scratch file: %w", err)
	}
	defer f.Remove()
	hasher := sha256.New()
	src := r
	if size >= 0 {
		src = io.LimitReader(r, size+1) // one byte over says it is too long
	}
	n, err := io.Copy(io.MultiWriter(f, hasher), src)
	if err != nil {
		return v1.Hash{}, n, err
	}
	got := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(hasher.Sum(nil))}
	if size >= 0 && n != size {
		return v1.Hash{}, n, fmt.Errorf("%w: got %d bytes, want %d", ErrDigestMismatch, n, size)
	}
	if want != (v1.Hash{}) && got != want {
		return v1.Hash{}, n, fmt.Errorf("%w: got %s, want %s", ErrDigestMismatch, got, want)
	}
	if _, ok := s.Has(got); ok {
		return got, n, nil
	}
	if err := f.Commit(s.Path(got)); err != nil {
		return v1.Hash{}, n, fmt.Errorf("store blob %s: %w", got, err)
	}
	return got, n, nil
}

// Adopt renames a finished scratch file whose digest the caller computed
// into place as blob h.
func (s *Store) Adopt(f *scratch.File, h v1.Hash) error {
	if err := check(h); err != nil {
		f.Remove()
		return err
	}
	if _, ok := s.Has(h); ok {
		f.Remove()
		return nil
	}
	return f.Commit(s.Path(h))
}

// Delete removes blob h; a missing blob is not an error.
func (s *Store) Delete(h v1.Hash) error {
	if err := check(h); err != nil {
		return err
	}
	err := os.Remove(s.Path(h))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// Walk calls fn for every stored blob.
func (s *Store) Walk(fn func(h v1.Hash, size int64) error) error {
	ents, err := os.ReadDir(filepath.Join(s.dir, "sha256"))
	if err != nil {
		return err
	}
	for _, e := range ents {
		h := v1.Hash{Algorithm: "sha256", Hex: e.Name()}
		if check(h) != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		if err := fn(h, info.Size()); err != nil {
			return err
		}
	}
	return nil
}

// check accepts only well-formed sha256 digests, so that a digest from a
// manifest can never name a path outside the store.
func check(h v1.Hash) error {
	if h.Algorithm != "sha256" || len(h.Hex) != 64 {
		return fmt.Errorf("unsupported digest %q", h.String())
	}
	for _, c := range h.Hex {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("malformed digest %q", h.String())
		}
	}
	return nil
}
