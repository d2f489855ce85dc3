package image

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// WriteOCILayout writes img as a tar of an OCI image layout (oci-layout,
// index.json, blobs/sha256/…) to w, straight from the store's blobs: the
// manifest, config and layers are written as stored, so the manifest's
// digest is img.Digest. index.json names the manifest with refName as
// org.opencontainers.image.ref.name when refName is not empty. Used to hand
// a base image to BuildKit (matchlock build).
func (s *Store) WriteOCILayout(img *Image, refName string, w io.Writer) error {
	tw := tar.NewWriter(w)
	now := time.Unix(0, 0)
	dir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: now})
	}
	file := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: now}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	mh, err := v1.NewHash(img.Digest)
	if err != nil {
		return fmt.Errorf("%w: manifest digest %q", ErrInvalidImage, img.Digest)
	}
	msize, ok := s.blobs.Has(mh)
	if !ok {
		return fmt.Errorf("%w: manifest %s of %s is missing from the store", ErrNotFound, img.Digest, img.Name())
	}
	desc := v1.Descriptor{MediaType: types.MediaType(img.MediaType), Digest: mh, Size: msize}
	if refName != "" {
		desc.Annotations = map[string]string{"org.opencontainers.image.ref.name": refName}
	}
	idx, _ := json.Marshal(v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{desc}})
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := dir(d); err != nil {
			return err
		}
	}
	if err := file("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	if err := file("index.json", idx); err != nil {
		return err
	}
	digests := []string{img.Digest, img.ConfigDigest}
	seen := map[string]bool{}
	for _, l := range img.Layers {
		digests = append(digests, l.Digest)
	}
	for _, d := range digests {
		if seen[d] {
			continue
		}
		seen[d] = true
		h, err := v1.NewHash(d)
		if err != nil {
			return fmt.Errorf("%w: digest %q", ErrInvalidImage, d)
		}
		f, err := s.blobs.Open(h)
		if err != nil {
			return fmt.Errorf("%w: blob %s of %s is missing from the store (pull or import it again)", ErrNotFound, d, img.Name())
		}
		fi, err := f.Stat()
		if err == nil {
			err = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "blobs/sha256/" + h.Hex, Mode: 0o644, Size: fi.Size(), ModTime: now})
		}
		if err == nil {
			_, err = io.Copy(tw, f)
		}
		f.Close()
		if err != nil {
			return err
		}
	}
	return tw.Close()
}
