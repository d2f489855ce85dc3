package archive

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Image is one image found in an archive, ready to be copied into a store.
type Image struct {
	Manifest       []byte  // raw manifest JSON (synthesised for docker archives)
	ManifestDigest v1.Hash // sha256 of Manifest
	MediaType      types.MediaType
	Config         []byte // raw config JSON
	ConfigDigest   v1.Hash
	Layers         []Layer  // lowest first
	Names          []string // references the archive names the image by
}

// Layer is one layer blob in the archive.
type Layer struct {
	MediaType types.MediaType
	Digest    v1.Hash // zero when the archive does not say (docker save): compute while copying
	Size      int64
	Open      func() io.Reader
}

// OCI reads the image for platform from an OCI layout. An index with several
// images is searched by platform, nested indexes included.
func (t *Tar) OCI(platform v1.Platform) (*Image, error) {
	b, err := t.ReadSmall("index.json")
	if err != nil {
		return nil, err
	}
	var names []string
	desc, err := t.pick(b, platform, 0, &names)
	if err != nil {
		return nil, err
	}
	img, err := t.ociImage(desc)
	if err != nil {
		return nil, err
	}
	img.Names = names
	return img, nil
}

// pick chooses the manifest for platform from an index's JSON.
func (t *Tar) pick(indexJSON []byte, platform v1.Platform, depth int, names *[]string) (v1.Descriptor, error) {
	if depth > 4 {
		return v1.Descriptor{}, fmt.Errorf("%w: indexes nested too deep", ErrFormat)
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(indexJSON))
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("%w: index: %v", ErrFormat, err)
	}
	var cands []v1.Descriptor
	for _, d := range idx.Manifests {
		if n := d.Annotations["io.containerd.image.name"]; n != "" && depth == 0 {
			*names = append(*names, n)
		}
		if d.Platform != nil && !PlatformMatches(*d.Platform, platform) {
			continue
		}
		if d.Platform != nil && d.Platform.OS == "unknown" { // attestation manifests
			continue
		}
		cands = append(cands, d)
	}
	for _, d := range cands {
		switch d.MediaType {
		case types.OCIImageIndex, types.DockerManifestList:
			b, err := t.blob(d)
			if err != nil {
				return v1.Descriptor{}, err
			}
			return t.pick(b, platform, depth+1, names)
		case types.OCIManifestSchema1, types.DockerManifestSchema2, "":
			return d, nil
		}
	}
	return v1.Descriptor{}, fmt.Errorf("%w: no image for %s in the archive's index", ErrFormat, platform)
}

// blob reads a small blob named by a descriptor and checks its digest.
func (t *Tar) blob(d v1.Descriptor) ([]byte, error) {
	if d.Digest.Algorithm != "sha256" || strings.ContainsAny(d.Digest.Hex, "/.") {
		return nil, fmt.Errorf("%w: unsupported digest %s", ErrFormat, d.Digest)
	}
	b, err := t.ReadSmall("blobs/sha256/" + d.Digest.Hex)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); fmt.Sprintf("%x", sum) != d.Digest.Hex {
		return nil, fmt.Errorf("%w: blob %s does not match its digest", ErrDigest, d.Digest)
	}
	return b, nil
}

// ErrDigest: a blob in the archive does not hash to its name.
var ErrDigest = fmt.Errorf("archive blob digest mismatch")

func (t *Tar) ociImage(desc v1.Descriptor) (*Image, error) {
	raw, err := t.blob(desc)
	if err != nil {
		return nil, err
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrFormat, err)
	}
	cfg, err := t.blob(m.Config)
	if err != nil {
		return nil, err
	}
	img := &Image{Manifest: raw, ManifestDigest: desc.Digest, MediaType: m.MediaType, Config: cfg, ConfigDigest: m.Config.Digest}
	if img.MediaType == "" {
		img.MediaType = types.OCIManifestSchema1
	}
	for _, l := range m.Layers {
		if l.Digest.Algorithm != "sha256" || len(l.Digest.Hex) != 64 {
			return nil, fmt.Errorf("%w: unsupported layer digest %s", ErrFormat, l.Digest)
		}
		r, err := t.Open("blobs/sha256/" + l.Digest.Hex)
		if err != nil {
			return nil, err
		}
		img.Layers = append(img.Layers, Layer{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size,
			Open: func() io.Reader { return io.NewSectionReader(r, 0, r.Size()) }})
	}
	return img, nil
}

// Docker reads an image from a docker save archive: the entry tagged want
// if given and present, else the only one.
func (t *Tar) Docker(want string) (*Image, error) {
	b, err := t.ReadSmall("manifest.json")
	if err != nil {
		return nil, err
	}
	var ms []dockerManifest
	if err := json.Unmarshal(b, &ms); err != nil || len(ms) == 0 {
		return nil, fmt.Errorf("%w: manifest.json: %v", ErrFormat, err)
	}
	m := ms[0]
	if len(ms) > 1 {
		found := false
		for _, c := range ms {
			for _, tag := range c.RepoTags {
				if tag == want {
					m, found = c, true
				}
			}
		}
		if !found {
			return nil, fmt.Errorf("%w: the archive holds %d images; name one of its tags", ErrFormat, len(ms))
		}
	}
	cfg, err := t.ReadSmall(m.Config)
	if err != nil {
		return nil, err
	}
	img := &Image{Config: cfg, ConfigDigest: sha(cfg), Names: m.RepoTags, MediaType: types.OCIManifestSchema1}
	manifest := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        v1.Descriptor{MediaType: types.OCIConfigJSON, Digest: img.ConfigDigest, Size: int64(len(cfg))},
	}
	for _, name := range m.Layers {
		r, err := t.Open(name)
		if err != nil {
			return nil, err
		}
		mt, err := sniffMediaType(r)
		if err != nil {
			return nil, err
		}
		img.Layers = append(img.Layers, Layer{MediaType: mt, Size: r.Size(),
			Open: func() io.Reader { return io.NewSectionReader(r, 0, r.Size()) }})
	}
	// The manifest needs the layer digests: they are filled in by Finish
	// once the layers have been hashed while copying.
	img.Manifest, _ = json.Marshal(manifest)
	return img, nil
}

// Finish completes a docker archive's synthesised manifest once every
// layer's digest is known.
func (img *Image) Finish() error {
	m, err := v1.ParseManifest(bytes.NewReader(img.Manifest))
	if err != nil {
		return err
	}
	m.Layers = nil
	for _, l := range img.Layers {
		if l.Digest == (v1.Hash{}) {
			return fmt.Errorf("layer digest unknown")
		}
		m.Layers = append(m.Layers, v1.Descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size})
	}
	img.Manifest, err = json.Marshal(m)
	img.ManifestDigest = sha(img.Manifest)
	return err
}

func sha(b []byte) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", sha256.Sum256(b))}
}

// sniffMediaType names a layer's compression from its first bytes.
func sniffMediaType(r io.ReaderAt) (types.MediaType, error) {
	var magic [4]byte
	n, err := r.ReadAt(magic[:], 0)
	if err != nil && err != io.EOF {
		return "", err
	}
	switch {
	case n >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		return types.OCILayer, nil
	case n >= 4 && bytes.Equal(magic[:], []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return types.OCILayerZStd, nil
	}
	return types.OCIUncompressedLayer, nil
}

// PlatformMatches reports whether have satisfies want: same OS and
// architecture, and the same variant when want names one (arm64 without a
// variant is v8).
func PlatformMatches(have, want v1.Platform) bool {
	if have.OS != want.OS || have.Architecture != want.Architecture {
		return false
	}
	if want.Variant == "" {
		return true
	}
	hv := have.Variant
	if hv == "" && have.Architecture == "arm64" {
		hv = "v8"
	}
	return hv == want.Variant
}
