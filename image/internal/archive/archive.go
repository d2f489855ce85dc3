// Package archive reads image archives held in a local tar file without
// extracting them: the tar is indexed once (name -> byte range) and blobs
// are read as sections of the file. It understands OCI image layouts
// (index.json + oci-layout) and `docker save` archives (manifest.json); any
// other tar is a plain root filesystem.
package archive

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

// Limits on what indexing an archive may cost.
const (
	maxMetadataFile = 8 << 20 // index.json, manifest.json, manifests, configs
)

// ErrFormat: the archive is not a tar, or its image metadata is broken.
var ErrFormat = errors.New("invalid image archive")

// Tar is an indexed tar file.
type Tar struct {
	f     *os.File
	files map[string]section // regular files by cleaned name
}

type section struct{ off, size int64 }

// Index reads the headers of the tar in f (seeking over contents). It fails
// for anything that is not a tar, or that has more than maxEntries entries.
func Index(f *os.File, maxEntries int) (*Tar, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	t := &Tar{f: f, files: map[string]section{}}
	tr := tar.NewReader(f)
	for n := 0; ; n++ {
		hdr, err := tr.Next()
		if err == io.EOF {
			if n == 0 {
				return nil, fmt.Errorf("%w: empty or not a tar archive", ErrFormat)
			}
			return t, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: not a tar archive: %v", ErrFormat, err)
		}
		if n >= maxEntries {
			return nil, fmt.Errorf("%w: more than %d entries", ErrFormat, maxEntries)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		off, err := f.Seek(0, io.SeekCurrent) // the reader has just read the header
		if err != nil {
			return nil, err
		}
		t.files[clean(hdr.Name)] = section{off: off, size: hdr.Size}
	}
}

func clean(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

// Has reports whether the archive holds a regular file called name.
func (t *Tar) Has(name string) bool { _, ok := t.files[clean(name)]; return ok }

// Open returns the contents of the regular file name.
func (t *Tar) Open(name string) (*io.SectionReader, error) {
	s, ok := t.files[clean(name)]
	if !ok {
		return nil, fmt.Errorf("%w: %s is missing", ErrFormat, name)
	}
	return io.NewSectionReader(t.f, s.off, s.size), nil
}

// ReadSmall reads a metadata file whole, refusing big ones.
func (t *Tar) ReadSmall(name string) ([]byte, error) {
	r, err := t.Open(name)
	if err != nil {
		return nil, err
	}
	if r.Size() > maxMetadataFile {
		return nil, fmt.Errorf("%w: %s is %d bytes, more than %d", ErrFormat, name, r.Size(), maxMetadataFile)
	}
	return io.ReadAll(r)
}

// Kind is what an archive holds.
type Kind int

const (
	Rootfs        Kind = iota // a plain root filesystem tar (docker import)
	OCILayout                 // an OCI image layout
	DockerArchive             // docker save
)

func (k Kind) String() string {
	return [...]string{"root filesystem tar", "OCI image layout", "docker save archive"}[k]
}

// Detect tells what the archive holds from the files at its top.
func (t *Tar) Detect() Kind {
	if t.Has("oci-layout") && t.Has("index.json") {
		return OCILayout
	}
	if t.Has("manifest.json") {
		if b, err := t.ReadSmall("manifest.json"); err == nil {
			var m []dockerManifest
			if json.Unmarshal(b, &m) == nil && len(m) > 0 && m[0].Config != "" && t.Has(m[0].Config) {
				return DockerArchive
			}
		}
	}
	return Rootfs
}

// dockerManifest is one entry of a docker save manifest.json.
type dockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}
