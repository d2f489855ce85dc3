// Package image is matchlock's local image store: it pulls images from OCI
// registries, imports image archives, names them, and turns an image into a
// read-only ext4 disk for a micro-VM.
//
// A Store lives in one directory (DefaultRoot unless the caller picks one):
//
//	index.db            SQLite index (WAL): images, names, converted disks
//	lock                flock: shared while writing blobs or disks, exclusive while pruning
//	blobs/sha256/<hex>  content-addressed blobs (manifests, configs, layers), shared by images
//	rootfs/<key>.ext4   converted root filesystems, one per distinct layer stack
//	locks/              flocks that make concurrent pulls and conversions do the work once
//	tmp/                scratch files, flocked by their writer; orphans are removed on Open
//
// Every blob and disk is written to tmp/, verified, then renamed into place,
// and the index changes in one transaction after the files it points at
// exist, so a process killed at any point leaves no half image: at worst
// unreferenced blobs, which Prune reclaims, and scratch files, which the
// next Open removes. Several matchlock processes may use one store at once.
//
// See docs/images.md for the formats accepted and the conversion's
// guarantees against hostile archives.
package image

import (
	"errors"
	"fmt"
	"time"

	"matchlock.dev/matchlock/image/internal/blobstore"
	"matchlock.dev/matchlock/image/rootfs"
)

// Errors callers can branch on with errors.Is. Returned errors wrap them
// with what was being done.
var (
	// ErrNotFound: no such image, tag or platform, locally or in the registry.
	ErrNotFound = errors.New("not found")
	// ErrUnauthorized: the registry refused the credentials (or their lack).
	ErrUnauthorized = errors.New("unauthorized")
	// ErrUnreachable: the registry could not be reached.
	ErrUnreachable = errors.New("registry unreachable")
	// ErrDigestMismatch: content does not hash to the digest it was named by.
	ErrDigestMismatch = blobstore.ErrDigestMismatch
	// ErrNoSpace: the disk holding the store is full.
	ErrNoSpace = errors.New("no space left on device")
	// ErrAmbiguous: a digest prefix matches more than one image.
	ErrAmbiguous = errors.New("ambiguous image reference")
	// ErrInvalidRef: the string is not an image reference.
	ErrInvalidRef = errors.New("invalid image reference")
	// ErrTooLarge: an image or archive unpacks to more than the store's limit.
	ErrTooLarge = rootfs.ErrTooLarge
	// ErrInvalidImage: an archive or layer is malformed or unsupported.
	ErrInvalidImage = errors.New("invalid image")
)

// Image is an image in the store, as named by one reference.
type Image struct {
	Ref          string    `json:"ref"`                   // the reference as the caller wrote it
	Repo         string    `json:"repo"`                  // canonical repository, registry included; "" if unnamed
	Tag          string    `json:"tag"`                   // "" when named by digest or unnamed
	Digest       string    `json:"digest"`                // manifest digest, sha256:<hex>
	IndexDigest  string    `json:"indexDigest,omitempty"` // multi-arch index it was picked from
	ConfigDigest string    `json:"configDigest"`
	MediaType    string    `json:"mediaType"` // manifest media type
	Platform     string    `json:"platform"`  // os/arch[/variant]
	Size         int64     `json:"size"`      // bytes of config and layer blobs, as stored
	Created      time.Time `json:"created"`   // from the image config; import time if it has none
	LastUsed     time.Time `json:"lastUsed"`
	Names        []string  `json:"names"` // every reference naming the image, familiar form
	Layers       []Layer   `json:"layers"`
	Config       Config    `json:"config"`
}

// Layer is one layer blob of an image, lowest first.
type Layer struct {
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType"`
}

// Config is the part of the OCI image config that says how to run it.
type Config struct {
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	Env          []string          `json:"env,omitempty"`
	WorkingDir   string            `json:"workingDir,omitempty"`
	User         string            `json:"user,omitempty"`
	ExposedPorts []string          `json:"exposedPorts,omitempty"` // "80/tcp", sorted
	Labels       map[string]string `json:"labels,omitempty"`
	StopSignal   string            `json:"stopSignal,omitempty"`
}

// Name is the image's familiar name: "busybox:latest", "localhost:5000/app@sha256:…",
// or the short digest when unnamed.
func (img *Image) Name() string {
	switch {
	case img.Repo == "":
		return ShortDigest(img.Digest)
	case img.Tag == "":
		return FamiliarRepo(img.Repo) + "@" + img.Digest
	}
	return FamiliarRepo(img.Repo) + ":" + img.Tag
}

// ShortDigest is the first 12 hex digits of a digest.
func ShortDigest(d string) string {
	if len(d) > 7+12 && d[:7] == "sha256:" {
		return d[7 : 7+12]
	}
	return d
}

// ProgressUpdate reports a pull's progress on one layer.
type ProgressUpdate struct {
	Layer    string // layer digest
	Index    int    // 0-based position of the layer
	Count    int    // number of layers
	Complete int64  // bytes fetched so far
	Total    int64  // size of the layer blob
	Cached   bool   // already in the store: nothing to fetch
	Done     bool   // fetched and verified (or cached)
}

// PruneReport says what Prune removed.
type PruneReport struct {
	Images int   // dangling images (no name left)
	Blobs  int   // blobs no image references
	Disks  int   // converted disks no image uses
	Bytes  int64 // space reclaimed
}

func (r PruneReport) String() string {
	return fmt.Sprintf("removed %d images, %d blobs, %d disks (%s)", r.Images, r.Blobs, r.Disks, HumanSize(r.Bytes))
}

// HumanSize formats a byte count in decimal units, as docker does.
func HumanSize(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	f := float64(n)
	for _, u := range []string{"kB", "MB", "GB", "TB"} {
		f /= unit
		if f < unit {
			return fmt.Sprintf("%.3g%s", f, u)
		}
	}
	return fmt.Sprintf("%.3gPB", f/unit)
}
