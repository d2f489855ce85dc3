package image

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	gzip "github.com/klauspost/compress/gzip"
	"io"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"

	"matchlock.dev/matchlock/image/internal/archive"
	"matchlock.dev/matchlock/image/internal/index"
	"matchlock.dev/matchlock/image/internal/scratch"
)

// Import reads an image archive from r and stores it under tag: a `docker
// save` tarball, an OCI image layout in a tar (index.json at its top), or a
// plain root filesystem tar, which becomes a one-layer image with an empty
// config (as `docker import`). The archive may be gzip, zstd or bzip2
// compressed. It is buffered in the store's scratch directory (never
// extracted) and every blob is verified on the way in. With tag "" the
// names the archive gives are used.
func (s *Store) Import(ctx context.Context, tag string, r io.Reader) (*Image, error) {
	img, err := s.importArchive(ctx, tag, r)
	if err != nil {
		what := "import"
		if tag != "" {
			what += " " + tag
		}
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return img, nil
}

func (s *Store) importArchive(ctx context.Context, tag string, r io.Reader) (*Image, error) {
	var names []index.Name
	if tag != "" {
		t, err := parseTag(tag)
		if err != nil {
			return nil, err
		}
		names = append(names, index.Name{Repo: t.Context().Name(), Tag: t.TagStr()})
	}
	plat, err := parsePlatform(s.platform, "")
	if err != nil {
		return nil, err
	}
	lk, err := s.lockShared(ctx)
	if err != nil {
		return nil, err
	}
	defer lk.Release()

	f, digest, err := s.buffer(ctx, r)
	if err != nil {
		return nil, err
	}
	defer f.Remove()
	t, err := archive.Index(f.File, s.limits.MaxEntries)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidImage, err)
	}

	var ai *archive.Image
	switch kind := t.Detect(); kind {
	case archive.OCILayout:
		ai, err = t.OCI(plat)
	case archive.DockerArchive:
		ai, err = t.Docker(familiarTag(tag))
	default:
		ai, err = s.rootfsArchive(f, digest, plat)
	}
	if err != nil {
		return nil, archiveErr(err)
	}
	if tag == "" {
		for _, n := range ai.Names {
			if t, err := parseTag(n); err == nil {
				names = append(names, index.Name{Repo: t.Context().Name(), Tag: t.TagStr()})
			}
		}
	}

	// Layers first, then config and manifest: the index row comes last.
	for i := range ai.Layers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		l := &ai.Layers[i]
		if l.Open == nil { // already stored (the buffered root filesystem)
			continue
		}
		h, _, err := s.blobs.Put(l.Open(), l.Digest, l.Size)
		if err != nil {
			return nil, diskErr(archiveErr(err), s.root)
		}
		l.Digest = h
	}
	if ai.ManifestDigest == (v1.Hash{}) {
		if err := ai.Finish(); err != nil {
			return nil, err
		}
	}
	if _, _, err := s.blobs.Put(bytes.NewReader(ai.Config), ai.ConfigDigest, int64(len(ai.Config))); err != nil {
		return nil, diskErr(archiveErr(err), s.root)
	}
	if _, _, err := s.blobs.Put(bytes.NewReader(ai.Manifest), ai.ManifestDigest, int64(len(ai.Manifest))); err != nil {
		return nil, diskErr(archiveErr(err), s.root)
	}
	row, err := s.row(ai.ManifestDigest, ai.MediaType, ai.Config, ai.ConfigDigest, ai.Layers)
	if err != nil {
		return nil, err
	}
	if err := s.db.Put(*row, names); err != nil {
		return nil, err
	}
	ref := tag
	if ref == "" {
		ref = ai.ManifestDigest.String()
	}
	if len(names) > 0 && tag == "" {
		ref = FamiliarRepo(names[0].Repo) + ":" + names[0].Tag
	}
	return s.resolve(ref)
}

// familiarTag is the familiar form of a tag reference ("busybox:latest"),
// as docker save archives spell their RepoTags; "" stays "".
func familiarTag(ref string) string {
	t, err := parseTag(ref)
	if err != nil {
		return ref
	}
	return FamiliarRepo(t.Context().Name()) + ":" + t.TagStr()
}

func archiveErr(err error) error {
	switch {
	case errors.Is(err, archive.ErrDigest):
		return fmt.Errorf("%w: %w", ErrDigestMismatch, err)
	case errors.Is(err, archive.ErrFormat):
		return fmt.Errorf("%w: %w", ErrInvalidImage, err)
	}
	return err
}

// buffer copies r, decompressed, into a scratch file, hashing it; the
// archive may not unpack to more than the store's byte limit.
func (s *Store) buffer(ctx context.Context, r io.Reader) (*scratch.File, v1.Hash, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic, _ := br.Peek(4)
	var src io.Reader = br
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, v1.Hash{}, fmt.Errorf("%w: gzip: %v", ErrInvalidImage, err)
		}
		defer zr.Close()
		src = zr
	case bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return nil, v1.Hash{}, fmt.Errorf("%w: zstd: %v", ErrInvalidImage, err)
		}
		defer zr.Close()
		src = zr
	case len(magic) >= 3 && string(magic[:3]) == "BZh":
		src = bzip2.NewReader(br)
	}
	f, err := s.tmp.Create("import-*")
	if err != nil {
		return nil, v1.Hash{}, diskErr(err, s.root)
	}
	h := sha256.New()
	limit := s.limits.MaxBytes
	n, err := io.Copy(io.MultiWriter(f, h), &ctxReader{ctx: ctx, r: io.LimitReader(src, limit+1)})
	if err == nil && n > limit {
		err = fmt.Errorf("%w: the archive unpacks to more than %d bytes", ErrTooLarge, limit)
	}
	if err != nil {
		f.Remove()
		return nil, v1.Hash{}, diskErr(err, s.root)
	}
	return f, v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}, nil
}

// rootfsArchive makes a one-layer image of a plain root filesystem tar: the
// buffered file is the layer, and the config says nothing but the platform.
func (s *Store) rootfsArchive(f *scratch.File, digest v1.Hash, plat v1.Platform) (*archive.Image, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	cfg := v1.ConfigFile{
		Architecture: plat.Architecture, OS: plat.OS, Variant: plat.Variant,
		Created: v1.Time{Time: s.now().UTC().Truncate(time.Second)},
		RootFS:  v1.RootFS{Type: "layers", DiffIDs: []v1.Hash{digest}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgDigest := sha(cfgJSON)
	m := v1.Manifest{
		SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Digest: cfgDigest, Size: int64(len(cfgJSON))},
		Layers: []v1.Descriptor{{MediaType: types.OCIUncompressedLayer, Digest: digest, Size: fi.Size()}},
	}
	mJSON, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	// The buffered archive is the layer blob: rename it into place (the
	// caller's deferred Remove then does nothing).
	if err := s.blobs.Adopt(f, digest); err != nil {
		return nil, diskErr(err, s.root)
	}
	return &archive.Image{
		Manifest: mJSON, ManifestDigest: sha(mJSON), MediaType: types.OCIManifestSchema1,
		Config: cfgJSON, ConfigDigest: cfgDigest,
		Layers: []archive.Layer{{MediaType: types.OCIUncompressedLayer, Digest: digest, Size: fi.Size()}},
	}, nil
}

// row builds the index row of an image whose blobs are all stored.
func (s *Store) row(mDigest v1.Hash, mt types.MediaType, cfgJSON []byte, cfgDigest v1.Hash, layers []archive.Layer) (*index.Image, error) {
	var cfg v1.ConfigFile
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return nil, fmt.Errorf("%w: config: %v", ErrInvalidImage, err)
	}
	if cfg.OS != "" && cfg.OS != "linux" {
		return nil, fmt.Errorf("%w: the image is for %s; matchlock runs linux images", ErrInvalidImage, cfg.OS)
	}
	now := s.now()
	row := &index.Image{
		Digest: mDigest.String(), MediaType: string(mt), ConfigDigest: cfgDigest.String(),
		Platform: platformString(v1.Platform{OS: "linux", Architecture: cfg.Architecture, Variant: cfg.Variant}),
		Config:   cfgJSON, Size: int64(len(cfgJSON)), Created: cfg.Created.Time, Added: now, LastUsed: now,
	}
	if cfg.Architecture == "" {
		row.Platform = s.platform
	}
	if row.Created.IsZero() || row.Created.Year() < 1980 {
		row.Created = now
	}
	for _, l := range layers {
		switch l.MediaType {
		case types.OCILayer, types.OCILayerZStd, types.OCIUncompressedLayer, types.DockerLayer, types.DockerUncompressedLayer:
		default:
			return nil, fmt.Errorf("%w: layer %s has unsupported media type %q", ErrInvalidImage, l.Digest, l.MediaType)
		}
		row.Layers = append(row.Layers, index.Layer{Digest: l.Digest.String(), Size: l.Size, MediaType: string(l.MediaType)})
		row.Size += l.Size
	}
	return row, nil
}

func sha(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

// ctxReader stops a long copy when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
