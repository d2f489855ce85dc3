package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	gzip "github.com/klauspost/compress/gzip"
	"hash"
	"io"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/zstd"

	"matchlock.dev/matchlock/image/internal/flock"
	"matchlock.dev/matchlock/image/internal/index"
	"matchlock.dev/matchlock/image/rootfs"
)

// rootfsFormat versions the conversion: bump it when the disk it makes
// changes, and old disks are converted again (and pruned).
const rootfsFormat = "matchlock-rootfs-v1"

// rootfsKey names the disk of a layer stack: images that share all their
// layers share one disk.
func rootfsKey(layers []index.Layer) string {
	h := sha256.New()
	io.WriteString(h, rootfsFormat+"\n")
	for _, l := range layers {
		io.WriteString(h, l.Digest+"\n")
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Rootfs returns the path of a read-only ext4 disk holding img's flattened
// root filesystem, converting it the first time. Concurrent callers, in
// this process or others, convert once; the others wait and share the
// result. The file must not be written to; it lives until Prune finds no
// image using it.
func (s *Store) Rootfs(ctx context.Context, img *Image) (string, error) {
	p, err := s.rootfs(ctx, img)
	if err != nil {
		return "", fmt.Errorf("root filesystem of %s: %w", img.Ref, err)
	}
	return p, nil
}

func (s *Store) rootfs(ctx context.Context, img *Image) (string, error) {
	layers := make([]index.Layer, len(img.Layers))
	for i, l := range img.Layers {
		layers[i] = index.Layer(l)
	}
	key := rootfsKey(layers)
	rel := filepath.Join("rootfs", key+".ext4")

	lk, err := s.lockShared(ctx)
	if err != nil {
		return "", err
	}
	defer lk.Release()
	if p, ok := s.cachedRootfs(key); ok {
		return p, nil
	}
	one, err := flock.Acquire(ctx, s.path("locks", "rootfs-"+key+".lock"), flock.Exclusive)
	if err != nil {
		return "", err
	}
	defer one.Release()
	if p, ok := s.cachedRootfs(key); ok { // converted while we waited
		return p, nil
	}

	openers := make([]rootfs.Opener, len(img.Layers))
	for i, l := range img.Layers {
		h, err := v1.NewHash(l.Digest)
		if err != nil {
			return "", fmt.Errorf("%w: layer digest %q", ErrInvalidImage, l.Digest)
		}
		openers[i] = func() (io.ReadCloser, error) { return s.openLayer(h) }
	}
	f, err := s.tmp.Create("rootfs-*")
	if err != nil {
		return "", diskErr(err, s.root)
	}
	defer f.Remove()
	if _, err := rootfs.WriteExt4(ctx, openers, f, s.limits); err != nil {
		return "", s.conversionErr(err, img)
	}
	if err := f.Chmod(0o444); err != nil {
		return "", err
	}
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	if err := f.Commit(s.path(rel)); err != nil {
		return "", diskErr(err, s.root)
	}
	now := s.now()
	if err := s.db.PutRootfs(index.Rootfs{Key: key, File: rel, Size: fi.Size(), Created: now, LastUsed: now}); err != nil {
		return "", err
	}
	return s.path(rel), nil
}

// conversionErr explains a failed conversion: a corrupt stored layer often
// shows as a broken tar long before its digest can be checked, so the
// layers are checked again here.
func (s *Store) conversionErr(err error, img *Image) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	for _, l := range img.Layers {
		h, herr := v1.NewHash(l.Digest)
		if herr != nil {
			continue
		}
		f, oerr := s.blobs.Open(h)
		if oerr != nil {
			continue
		}
		sum := sha256.New()
		_, cerr := io.Copy(sum, f)
		f.Close()
		if cerr == nil && hex.EncodeToString(sum.Sum(nil)) != h.Hex {
			return fmt.Errorf("%w: stored layer %s is corrupt (remove the image and pull it again)", ErrDigestMismatch, h)
		}
	}
	switch {
	case errors.Is(err, rootfs.ErrInvalid):
		return fmt.Errorf("%w: %w", ErrInvalidImage, err)
	case errors.Is(err, rootfs.ErrTooManyEntries):
		return fmt.Errorf("%w: %w", ErrTooLarge, err)
	}
	return diskErr(err, s.root)
}

// cachedRootfs returns the disk for key if it is recorded and present.
func (s *Store) cachedRootfs(key string) (string, bool) {
	r, err := s.db.GetRootfs(key, s.now())
	if err != nil {
		return "", false
	}
	p := s.path(r.File)
	if fi, err := os.Stat(p); err != nil || fi.Size() != r.Size {
		return "", false
	}
	return p, true
}

// openLayer opens a layer blob as an uncompressed tar stream, decompressing
// gzip or zstd as its first bytes say, and checking the blob's digest when
// the stream ends.
func (s *Store) openLayer(h v1.Hash) (io.ReadCloser, error) {
	f, err := s.blobs.Open(h)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: layer %s is missing from the store (pull or import the image again)", ErrNotFound, h)
		}
		return nil, err
	}
	vr := &verifyReader{r: f, h: sha256.New(), want: h}
	br := bufio.NewReaderSize(vr, 1<<20)
	magic, _ := br.Peek(4)
	lr := &layerReader{f: f, verify: vr, br: br}
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%w: layer %s: %v", ErrInvalidImage, h, err)
		}
		lr.r, lr.close = zr, zr.Close
	case bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%w: layer %s: %v", ErrInvalidImage, h, err)
		}
		lr.r, lr.close = zr, func() error { zr.Close(); return nil }
	default:
		lr.r = br
	}
	return lr, nil
}

// layerReader is a decompressed layer. At the end of the decompressed
// stream it reads what is left of the blob, so that the digest is always
// checked before it reports io.EOF.
type layerReader struct {
	f      *os.File
	verify *verifyReader
	br     *bufio.Reader
	r      io.Reader
	close  func() error
}

func (l *layerReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	if err == io.EOF {
		if _, derr := io.Copy(io.Discard, l.br); derr != nil {
			return n, derr
		}
	}
	return n, err
}

func (l *layerReader) Close() error {
	if l.close != nil {
		l.close()
	}
	return l.f.Close()
}

// verifyReader hashes what it reads and fails at the end on a mismatch.
type verifyReader struct {
	r    io.Reader
	h    hash.Hash
	want v1.Hash
}

func (v *verifyReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	if err == io.EOF && hex.EncodeToString(v.h.Sum(nil)) != v.want.Hex {
		return n, fmt.Errorf("%w: stored layer %s is corrupt (remove the image and pull it again)", ErrDigestMismatch, v.want)
	}
	return n, err
}
