package image_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/image/imagetest"
)

func checkBusybox(t *testing.T, img *image.Image) {
	t.Helper()
	if !slices.Equal(img.Config.Cmd, []string{"/bin/sh"}) || len(img.Config.Env) != 1 ||
		!slices.Equal(img.Config.ExposedPorts, []string{"8080/tcp"}) || img.Config.Labels["org.opencontainers.image.title"] != "busybox" {
		t.Errorf("config: %+v", img.Config)
	}
	if img.Platform != hostPlatform || len(img.Layers) != 1 || img.Size <= 0 {
		t.Errorf("platform %s, %d layers, size %d", img.Platform, len(img.Layers), img.Size)
	}
	if img.Created.Year() != 2023 {
		t.Errorf("created %v", img.Created)
	}
}

func TestImportDockerArchive(t *testing.T) {
	s := openStore(t)
	bb := imagetest.Busybox(t, hostPlatform)
	archive := imagetest.DockerArchive(t, bb, "example.com/tools/busybox:1.36")

	img, err := s.Import(bg, "bb:1", bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	if img.Repo != "index.docker.io/library/bb" || img.Tag != "1" || img.Ref != "bb:1" {
		t.Errorf("named %s %s %s", img.Ref, img.Repo, img.Tag)
	}
	// No tag: the archive's own RepoTags name it.
	img2, err := s.Import(bg, "", bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	if img2.Digest != img.Digest || img2.Name() != "example.com/tools/busybox:1.36" {
		t.Errorf("second import %s %s, want %s", img2.Name(), img2.Digest, img.Digest)
	}
	if _, err := s.Resolve("example.com/tools/busybox:1.36"); err != nil {
		t.Error(err)
	}
}

func TestImportOCIArchive(t *testing.T) {
	s := openStore(t)
	bb := imagetest.Busybox(t, hostPlatform)
	archive := imagetest.OCIArchive(t, func(p layout.Path) error { return p.AppendImage(bb) })
	img, err := s.Import(bg, "oci:1", bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	// An OCI layout keeps the manifest as it is: the digest is the image's.
	if want := digestOf(t, bb); img.Digest != want {
		t.Errorf("digest %s, want %s", img.Digest, want)
	}
}

func TestImportOCIArchiveMultiArch(t *testing.T) {
	other := "linux/arm64"
	if hostPlatform == other {
		other = "linux/amd64"
	}
	here, there := imagetest.Busybox(t, hostPlatform), imagetest.Busybox(t, other)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: there, Descriptor: v1.Descriptor{Platform: mustPlatform(t, other)}},
		mutate.IndexAddendum{Add: here, Descriptor: v1.Descriptor{Platform: mustPlatform(t, hostPlatform)}})
	archive := imagetest.OCIArchive(t, func(p layout.Path) error { return p.AppendIndex(idx) })

	img, err := openStore(t).Import(bg, "multi:1", bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, here) || img.Platform != hostPlatform {
		t.Errorf("picked %s %s, want %s", img.Platform, img.Digest, digestOf(t, here))
	}
	img, err = openStore(t, image.WithPlatform(other)).Import(bg, "multi:1", bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, there) || img.Platform != other {
		t.Errorf("picked %s %s, want %s", img.Platform, img.Digest, digestOf(t, there))
	}
}

func mustPlatform(t *testing.T, s string) *v1.Platform {
	p, err := v1.ParsePlatform(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestImportRootfsTar(t *testing.T) {
	rootfs := imagetest.Tar(t,
		imagetest.Entry{Name: "bin/", Type: tar.TypeDir},
		imagetest.Entry{Name: "bin/hello", Mode: 0o755, Body: []byte("#!/bin/sh\necho hi\n")},
		imagetest.Entry{Name: "etc/os-release", Body: []byte("ID=test\n")},
	)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(rootfs)
	zw.Close()

	s := openStore(t)
	for _, in := range [][]byte{rootfs, gz.Bytes()} {
		img, err := s.Import(bg, "plain:latest", bytes.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		if len(img.Layers) != 1 || img.Layers[0].Size != int64(len(rootfs)) || img.Platform != hostPlatform {
			t.Errorf("layers %+v, platform %s", img.Layers, img.Platform)
		}
		if len(img.Config.Cmd) != 0 || len(img.Config.Env) != 0 || img.Config.Entrypoint != nil {
			t.Errorf("config not empty: %+v", img.Config)
		}
		disk, err := s.Rootfs(bg, img)
		if err != nil {
			t.Fatal(err)
		}
		if got := debugfs(t, disk, "cat /etc/os-release"); got != "ID=test\n" {
			t.Errorf("os-release %q", got)
		}
	}
	if got := scratchFiles(t, s); len(got) != 0 {
		t.Errorf("scratch files left: %v", got)
	}
}

func TestImportRejectsGarbage(t *testing.T) {
	s := openStore(t)
	_, err := s.Import(bg, "junk:1", bytes.NewReader(bytes.Repeat([]byte("junk"), 1000)))
	if !errors.Is(err, image.ErrInvalidImage) {
		t.Fatalf("got %v, want ErrInvalidImage", err)
	}
	if _, err := s.Import(bg, "x@sha256:"+string(bytes.Repeat([]byte("a"), 64)), bytes.NewReader(nil)); !errors.Is(err, image.ErrInvalidRef) {
		t.Fatalf("digest as tag: got %v, want ErrInvalidRef", err)
	}
	// A decompression bomb stops at the store's limit.
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(make([]byte, 32<<20))
	zw.Close()
	small := openStore(t, image.WithLimits(4<<20, 0))
	if _, err := small.Import(bg, "bomb:1", bytes.NewReader(gz.Bytes())); !errors.Is(err, image.ErrTooLarge) {
		t.Fatalf("bomb: got %v, want ErrTooLarge", err)
	}
	if got := scratchFiles(t, small); len(got) != 0 {
		t.Errorf("scratch files left: %v", got)
	}
}
