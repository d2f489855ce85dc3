package rootfs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
)

// Errors a conversion can fail with; wrapped with detail.
var (
	// ErrTooLarge: the layers unpack to more than Limits.MaxBytes.
	ErrTooLarge = errors.New("image too large")
	// ErrTooManyEntries: the layers hold more than Limits.MaxEntries entries.
	ErrTooManyEntries = errors.New("image has too many files")
	// ErrInvalid: a layer is not a readable tar or holds a name or value that
	// an ext4 filesystem cannot represent.
	ErrInvalid = errors.New("invalid layer")
)

// Default limits: what one image may make the host read and write.
const (
	DefaultMaxBytes   = 16 << 30 // uncompressed tar bytes, all layers together
	DefaultMaxEntries = 1 << 20  // tar entries, all layers together
)

// Limits bound the work a conversion does for an untrusted image. Zero
// fields take the defaults.
type Limits struct {
	MaxBytes   int64 // uncompressed layer bytes read, and file contents written
	MaxEntries int   // tar entries read
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

// Stats describe a finished conversion.
type Stats struct {
	Entries   int   // tar entries read, all layers
	Files     int   // inodes in the result, directories included
	Bytes     int64 // regular-file content written
	Whiteouts int   // whiteout and opaque markers applied
	Skipped   int   // entries dropped (see the package doc)
}

// Opener opens the uncompressed tar stream of one layer. It is called once
// or twice per layer; each stream must yield the same bytes. A stream that
// verifies a digest should fail its last Read on a mismatch: the first pass
// always reads every layer to its end.
type Opener func() (io.ReadCloser, error)

// Flatten reads layers (lowest first) and writes one tar stream holding the
// merged filesystem: whiteouts and opaque directories applied, every name
// confined to the root and present once, directories before their contents,
// hard links after their targets. Nothing touches the host filesystem.
func Flatten(ctx context.Context, layers []Opener, w io.Writer, lim Limits) (Stats, error) {
	lim = lim.withDefaults()
	t, err := scan(ctx, layers, lim)
	if err != nil {
		return Stats{}, err
	}
	return t.emit(ctx, layers, w)
}

// scan is the first pass: it reads every header of every layer and builds
// the merged tree, remembering where each surviving file's content is.
// Layers are read (decompressed, hashed) in parallel, one per CPU, and
// applied in order.
func scan(ctx context.Context, layers []Opener, lim Limits) (*tree, error) {
	t := newTree(lim)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sh := &shared{max: lim.MaxBytes, maxEntries: int64(lim.MaxEntries)}
	sh.left.Store(lim.MaxBytes)
	results := make([]chan headersOrErr, len(layers))
	sem := make(chan struct{}, max(1, runtime.GOMAXPROCS(0)))
	for i, open := range layers {
		results[i] = make(chan headersOrErr, 1)
		go func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				results[i] <- headersOrErr{err: ctx.Err()}
				return
			}
			defer func() { <-sem }()
			hdrs, err := readHeaders(ctx, open, sh)
			results[i] <- headersOrErr{hdrs, err}
		}()
	}
	for i := range layers {
		r := <-results[i]
		if r.err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, r.err)
		}
		for ordinal, hdr := range r.hdrs {
			if err := t.apply(hdr, i, ordinal); err != nil {
				return nil, fmt.Errorf("layer %d: %w", i+1, err)
			}
		}
		t.entries += len(r.hdrs)
	}
	t.stats.Entries = t.entries
	return t, nil
}

type headersOrErr struct {
	hdrs []*tar.Header
	err  error
}

// shared is what all layers of a scan draw on: uncompressed bytes and
// entries left.
type shared struct {
	left       atomic.Int64
	entries    atomic.Int64
	max        int64
	maxEntries int64
}

// readHeaders reads every header of one layer, and the layer to its end.
func readHeaders(ctx context.Context, open Opener, sh *shared) ([]*tar.Header, error) {
	rc, err := open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	r := &budgetReader{r: rc, b: sh}
	tr := tar.NewReader(r)
	var hdrs []*tar.Header
	for {
		if len(hdrs)%256 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, readErr(err)
		}
		if hdr.Size > sh.max { // checked before the reader tries to skip it
			return nil, fmt.Errorf("%w: %q claims %d bytes, more than %d", ErrTooLarge, hdr.Name, hdr.Size, sh.max)
		}
		if sh.entries.Add(1) > sh.maxEntries {
			return nil, fmt.Errorf("%w: more than %d entries", ErrTooManyEntries, sh.maxEntries)
		}
		hdrs = append(hdrs, hdr)
	}
	// Read to the end so that a verifying stream checks its digest, and so
	// that trailing bytes count against the budget.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return nil, readErr(err)
	}
	return hdrs, nil
}

// readErr marks tar decoding failures as ErrInvalid and leaves the stream's
// own errors (budget, digest, I/O) as they are.
func readErr(err error) error {
	if errors.Is(err, tar.ErrHeader) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, tar.ErrFieldTooLong) {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return err
}

// emit is the second pass: it writes the planned tree as one tar stream,
// copying file contents straight from the layer streams that hold them.
func (t *tree) emit(ctx context.Context, layers []Opener, w io.Writer) (Stats, error) {
	dirs, files, links := t.plan()
	stats := t.stats
	stats.Files = 1 + len(dirs) + len(files)

	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(header("", &t.root.ino.meta)); err != nil {
		return Stats{}, err
	}
	for _, d := range dirs {
		if err := tw.WriteHeader(header(d.ino.path, &d.ino.meta)); err != nil {
			return Stats{}, err
		}
	}

	// Content, layer by layer, in stream order.
	wanted := make([]map[int]*inode, len(layers))
	var rest []*inode
	for _, ino := range files {
		if ino.typ == tar.TypeReg && ino.size > 0 {
			if wanted[ino.layer] == nil {
				wanted[ino.layer] = map[int]*inode{}
			}
			wanted[ino.layer][ino.ordinal] = ino
			continue
		}
		rest = append(rest, ino)
	}
	for i, want := range wanted {
		if len(want) == 0 {
			continue
		}
		n, err := copyLayer(ctx, tw, layers[i], want)
		if err != nil {
			return Stats{}, fmt.Errorf("layer %d: %w", i+1, err)
		}
		stats.Bytes += n
	}

	for _, ino := range rest {
		if err := tw.WriteHeader(header(ino.path, &ino.meta)); err != nil {
			return Stats{}, err
		}
	}
	for _, l := range links {
		h := &tar.Header{Typeflag: tar.TypeLink, Name: l.path, Linkname: l.ino.path, Format: tar.FormatPAX,
			Mode: l.ino.mode, Uid: l.ino.uid, Gid: l.ino.gid, ModTime: l.ino.mtime}
		if err := tw.WriteHeader(h); err != nil {
			return Stats{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return Stats{}, err
	}
	return stats, nil
}

// copyLayer writes the wanted entries of one layer, stopping after the last.
func copyLayer(ctx context.Context, tw *tar.Writer, open Opener, want map[int]*inode) (int64, error) {
	last := 0
	for o := range want {
		last = max(last, o)
	}
	rc, err := open()
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var written int64
	for ordinal := 0; ordinal <= last; ordinal++ {
		hdr, err := tr.Next()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return written, fmt.Errorf("second read: %w", readErr(err))
		}
		ino := want[ordinal]
		if ino == nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return written, err
		}
		if hdr.Name != ino.srcName || hdr.Size != ino.size {
			return written, fmt.Errorf("%w: layer changed between reads at %q", ErrInvalid, hdr.Name)
		}
		if err := tw.WriteHeader(header(ino.path, &ino.meta)); err != nil {
			return written, err
		}
		n, err := io.CopyN(tw, tr, ino.size)
		written += n
		if err != nil {
			return written, readErr(err)
		}
	}
	return written, nil
}

// budgetReader fails once the shared byte budget is spent: a decompression
// bomb stops at the limit (give or take one read) instead of filling the
// disk or burning the CPU.
type budgetReader struct {
	r io.Reader
	b *shared
}

func (r *budgetReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if r.b.left.Add(-int64(n)) < 0 {
		return 0, fmt.Errorf("%w: layers unpack to more than %d bytes", ErrTooLarge, r.b.max)
	}
	return n, err
}
