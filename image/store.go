package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"matchlock.dev/matchlock/image/internal/blobstore"
	"matchlock.dev/matchlock/image/internal/flock"
	"matchlock.dev/matchlock/image/internal/index"
	"matchlock.dev/matchlock/image/internal/scratch"
	"matchlock.dev/matchlock/image/rootfs"
)

// CacheEnv overrides the cache base directory; images live in its images/.
const CacheEnv = "MATCHLOCK_CACHE"

// DefaultRoot is the store directory: $MATCHLOCK_CACHE/images, else
// ${XDG_CACHE_HOME:-~/.cache}/matchlock/images.
func DefaultRoot() (string, error) {
	if base := os.Getenv(CacheEnv); base != "" {
		return filepath.Join(base, "images"), nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find the image cache: %w (set %s)", err, CacheEnv)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "matchlock", "images"), nil
}

// OpenDefault opens the store at DefaultRoot.
func OpenDefault(opts ...Option) (*Store, error) {
	root, err := DefaultRoot()
	if err != nil {
		return nil, err
	}
	return Open(root, opts...)
}

// Store is an image store in one directory (see the package doc for its
// layout). Safe for concurrent use by goroutines and by processes.
type Store struct {
	root     string
	db       *index.DB
	blobs    *blobstore.Store
	tmp      *scratch.Dir
	limits   rootfs.Limits
	platform string // default platform, linux/GOARCH
	now      func() time.Time
}

// Option configures a Store.
type Option func(*Store)

// WithLimits bounds what one image may make the store unpack: uncompressed
// bytes (archives and layers) and tar entries. Zero keeps a default
// (16 GiB, 1 Mi entries).
func WithLimits(maxBytes int64, maxEntries int) Option {
	return func(s *Store) { s.limits = rootfs.Limits{MaxBytes: maxBytes, MaxEntries: maxEntries} }
}

// WithPlatform sets the platform pulls and imports pick from multi-arch
// images when the caller names none ("linux/arm64").
func WithPlatform(p string) Option { return func(s *Store) { s.platform = p } }

// Open opens (creating it if needed) the store rooted at root, and removes
// what killed processes left in its scratch directory.
func Open(root string, opts ...Option) (*Store, error) {
	s := &Store{root: root, platform: "linux/" + runtime.GOARCH, now: time.Now}
	for _, o := range opts {
		o(s)
	}
	s.limits.MaxBytes = max(s.limits.MaxBytes, 0)
	if s.limits.MaxBytes == 0 {
		s.limits.MaxBytes = rootfs.DefaultMaxBytes
	}
	if s.limits.MaxEntries <= 0 {
		s.limits.MaxEntries = rootfs.DefaultMaxEntries
	}
	if _, err := parsePlatform(s.platform, ""); err != nil {
		return nil, err
	}
	for _, d := range []string{root, s.path("locks"), s.path("rootfs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("open image store: %w", diskErr(err, root))
		}
	}
	var err error
	if s.tmp, err = scratch.New(s.path("tmp")); err != nil {
		return nil, fmt.Errorf("open image store: %w", diskErr(err, root))
	}
	if s.blobs, err = blobstore.New(s.path("blobs"), s.tmp); err != nil {
		return nil, fmt.Errorf("open image store: %w", diskErr(err, root))
	}
	if s.db, err = index.Open(s.path("index.db")); err != nil {
		return nil, fmt.Errorf("open image index %s: %w", s.path("index.db"), err)
	}
	s.tmp.Clean()
	return s, nil
}

// Close closes the index.
func (s *Store) Close() error { return s.db.Close() }

// Root is the store's directory.
func (s *Store) Root() string { return s.root }

func (s *Store) path(p ...string) string { return filepath.Join(append([]string{s.root}, p...)...) }

// lockShared is held by everything that adds files the index will point at,
// so that Prune (exclusive) never deletes a blob between its write and its
// index row.
func (s *Store) lockShared(ctx context.Context) (*flock.Lock, error) {
	return flock.Acquire(ctx, s.path("lock"), flock.Shared)
}

// diskErr marks a full disk so that callers and users see it as such.
func diskErr(err error, root string) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w under %s (free space, run \"matchlock image prune\", or set %s): %w", ErrNoSpace, root, CacheEnv, err)
	}
	return err
}

// image converts an index row to an Image named by ref.
func (s *Store) image(row *index.Image, ref string, n *index.Name, names []index.Name) (*Image, error) {
	img := &Image{
		Ref: ref, Digest: row.Digest, IndexDigest: row.IndexDigest, ConfigDigest: row.ConfigDigest,
		MediaType: row.MediaType, Platform: row.Platform, Size: row.Size, Created: row.Created, LastUsed: row.LastUsed,
	}
	if n != nil {
		img.Repo, img.Tag = n.Repo, n.Tag
	}
	for _, nm := range names {
		img.Names = append(img.Names, FamiliarRepo(nm.Repo)+strings.TrimPrefix(nm.Key(), nm.Repo))
	}
	for _, l := range row.Layers {
		img.Layers = append(img.Layers, Layer(l))
	}
	var cfg v1.ConfigFile
	if len(row.Config) > 0 {
		if err := json.Unmarshal(row.Config, &cfg); err != nil {
			return nil, fmt.Errorf("image %s: %w: config: %v", row.Digest, ErrInvalidImage, err)
		}
	}
	c := cfg.Config
	img.Config = Config{Entrypoint: c.Entrypoint, Cmd: c.Cmd, Env: c.Env, WorkingDir: c.WorkingDir, User: c.User,
		Labels: c.Labels, StopSignal: c.StopSignal}
	for p := range c.ExposedPorts {
		img.Config.ExposedPorts = append(img.Config.ExposedPorts, p)
	}
	sort.Strings(img.Config.ExposedPorts)
	return img, nil
}

func (s *Store) namesOf(dgst string) ([]index.Name, error) {
	all, err := s.db.Names()
	if err != nil {
		return nil, err
	}
	return all[dgst], nil
}

// Resolve finds a local image by name ("busybox" is busybox:latest, as for
// pull), by name@digest, by digest, or by a unique prefix of the digest's
// hex (at least 4 digits). ErrNotFound if there is none.
func (s *Store) Resolve(ref string) (*Image, error) {
	img, err := s.resolve(ref)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", ref, err)
	}
	return img, nil
}

func (s *Store) resolve(ref string) (*Image, error) {
	row, n, err := s.lookup(ref)
	if err != nil {
		return nil, err
	}
	names, err := s.namesOf(row.Digest)
	if err != nil {
		return nil, err
	}
	return s.image(row, ref, n, names)
}

// lookup finds the index row a reference names, and the name it used if any.
func (s *Store) lookup(ref string) (*index.Image, *index.Name, error) {
	if ref == "" {
		return nil, nil, fmt.Errorf("%w: empty", ErrInvalidRef)
	}
	if r, err := parseRef(ref); err == nil {
		switch r := r.(type) {
		case name.Tag:
			n, err := s.db.Lookup(r.Context().Name() + ":" + r.TagStr())
			if err == nil {
				row, err := s.db.Get(n.Digest)
				return row, n, err
			}
			if !errors.Is(err, index.ErrNotFound) {
				return nil, nil, err
			}
		case name.Digest:
			row, err := s.byDigest(r.DigestStr())
			if err != nil {
				return nil, nil, err
			}
			n := &index.Name{Repo: r.Context().Name(), Pinned: r.DigestStr(), Digest: row.Digest}
			return row, n, nil
		}
	}
	if hexPrefix, ok := digestPrefix(ref); ok {
		rows, err := s.db.ByPrefix(hexPrefix)
		if err != nil {
			return nil, nil, err
		}
		switch len(rows) {
		case 0:
		case 1:
			return &rows[0], nil, nil
		default:
			return nil, nil, fmt.Errorf("%w: %s matches %d images; give more digits", ErrAmbiguous, ref, len(rows))
		}
	}
	return nil, nil, fmt.Errorf("%w: no such image in the store (pull or import it first)", ErrNotFound)
}

// byDigest finds the image with a manifest digest, or the one picked for
// this store's platform from an index digest.
func (s *Store) byDigest(dgst string) (*index.Image, error) {
	row, err := s.db.Get(dgst)
	if err == nil || !errors.Is(err, index.ErrNotFound) {
		return row, err
	}
	rows, err := s.db.ByIndex(dgst)
	if err != nil {
		return nil, err
	}
	for i := range rows {
		if rows[i].Platform == s.platform {
			return &rows[i], nil
		}
	}
	if len(rows) > 0 {
		return &rows[0], nil
	}
	return nil, fmt.Errorf("%w: no image with digest %s in the store", ErrNotFound, dgst)
}

// digestPrefix accepts "sha256:<hex>" and bare hex of at least 4 digits.
func digestPrefix(s string) (string, bool) {
	h := strings.TrimPrefix(s, "sha256:")
	if len(h) < 4 || len(h) > 64 {
		return "", false
	}
	for _, c := range h {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", false
		}
	}
	return h, true
}

// List returns every image once per name (newest first), and once for each
// image that has no name.
func (s *Store) List() ([]*Image, error) {
	rows, err := s.db.All()
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	names, err := s.db.Names()
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []*Image
	for i := range rows {
		row := &rows[i]
		ns := names[row.Digest]
		if len(ns) == 0 {
			img, err := s.image(row, ShortDigest(row.Digest), nil, nil)
			if err != nil {
				return nil, err
			}
			out = append(out, img)
		}
		for j := range ns {
			img, err := s.image(row, "", &ns[j], ns)
			if err != nil {
				return nil, err
			}
			img.Ref = img.Name()
			out = append(out, img)
		}
	}
	return out, nil
}

// Remove removes a name; the image goes with its last name. Given a digest
// (or a prefix) it removes the image and all its names. Blobs and disks stay
// until Prune.
func (s *Store) Remove(ref string) error {
	if err := s.remove(ref); err != nil {
		return fmt.Errorf("remove %s: %w", ref, err)
	}
	return nil
}

func (s *Store) remove(ref string) error {
	if r, err := parseRef(ref); err == nil {
		key := r.Context().Name() + ":" + r.Identifier()
		if d, ok := r.(name.Digest); ok {
			key = d.Context().Name() + "@" + d.DigestStr()
		}
		_, err := s.db.RemoveName(key)
		if err == nil || !errors.Is(err, index.ErrNotFound) {
			return err
		}
	}
	row, n, err := s.lookup(ref)
	if err != nil {
		return err
	}
	if n != nil && n.Tag != "" { // cannot happen: tags were tried above
		_, err := s.db.RemoveName(n.Key())
		return err
	}
	return s.db.DeleteImage(row.Digest)
}

// Tag gives the image src the name dst (a name:tag), moving dst if it
// named another image.
func (s *Store) Tag(src, dst string) error {
	tag, err := parseTag(dst)
	if err != nil {
		return fmt.Errorf("tag %s %s: %w", src, dst, err)
	}
	row, _, err := s.lookup(src)
	if err != nil {
		return fmt.Errorf("tag %s: %w", src, err)
	}
	if err := s.db.SetName(index.Name{Repo: tag.Context().Name(), Tag: tag.TagStr(), Digest: row.Digest}); err != nil {
		return fmt.Errorf("tag %s %s: %w", src, dst, err)
	}
	return nil
}

// Touch records that img was used now.
func (s *Store) Touch(img *Image) error {
	if err := s.db.Touch(img.Digest, s.now()); err != nil {
		return fmt.Errorf("touch %s: %w", img.Ref, err)
	}
	return nil
}

// Prune deletes images that have no name, then the blobs and converted
// disks that no image uses, and scratch files left by killed processes. It
// waits for pulls, imports and conversions in progress to finish.
func (s *Store) Prune(ctx context.Context) (PruneReport, error) {
	var rep PruneReport
	lk, err := flock.Acquire(ctx, s.path("lock"), flock.Exclusive)
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	defer lk.Release()
	dangling, err := s.db.DeleteDangling()
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	rep.Images = len(dangling)
	rows, err := s.db.All()
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	used := map[string]bool{}
	disks := map[string]bool{}
	for _, r := range rows {
		used[r.Digest], used[r.ConfigDigest] = true, true
		for _, l := range r.Layers {
			used[l.Digest] = true
		}
		disks[rootfsKey(r.Layers)] = true
	}
	err = s.blobs.Walk(func(h v1.Hash, size int64) error {
		if used[h.String()] {
			return nil
		}
		if err := s.blobs.Delete(h); err != nil {
			return err
		}
		rep.Blobs++
		rep.Bytes += size
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("prune blobs: %w", err)
	}
	entries, err := s.db.AllRootfs()
	if err != nil {
		return rep, fmt.Errorf("prune disks: %w", err)
	}
	known := map[string]bool{}
	for _, e := range entries {
		if disks[e.Key] {
			known[e.File] = true
			continue
		}
		if err := s.db.DeleteRootfs(e.Key); err != nil {
			return rep, fmt.Errorf("prune disks: %w", err)
		}
	}
	files, _ := os.ReadDir(s.path("rootfs"))
	for _, f := range files {
		rel := filepath.Join("rootfs", f.Name())
		if known[rel] {
			continue
		}
		if info, err := f.Info(); err == nil && os.Remove(s.path(rel)) == nil {
			rep.Disks++
			rep.Bytes += info.Size()
		}
	}
	// No pull or conversion runs while the store is locked exclusively, so
	// nobody waits on these: drop them rather than let them pile up.
	if locks, err := os.ReadDir(s.path("locks")); err == nil {
		for _, l := range locks {
			os.Remove(s.path("locks", l.Name()))
		}
	}
	s.tmp.Clean()
	return rep, nil
}
