package workspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/internal/paths"
)

// Named volumes are sparse ext4 images, VolumesDir()/NAME.ext4, attached to
// a sandbox as an extra virtio-blk disk. Their data outlives sandboxes. An
// attached volume's image is flock(2)ed exclusively by the process that owns
// the sandbox, so one sandbox at a time uses it (ext4 is not a cluster
// filesystem); the lock goes away with that process, even on SIGKILL.

// Sentinel errors of volume operations.
var (
	ErrVolumeExists   = errors.New("volume already exists")
	ErrVolumeNotFound = errors.New("no such volume")
	ErrVolumeInUse    = errors.New("volume is in use by another sandbox")
)

// Volume size bounds and default, in MiB.
const (
	DefaultVolumeMiB = 1024
	MinVolumeMiB     = 16
	MaxVolumeMiB     = 16 << 20
)

// VolumesDir is where named volumes live.
func VolumesDir() string { return filepath.Join(paths.StateDir(), "volumes") }

// ValidVolumeName reports whether n can name a volume: 1 to 64 letters,
// digits, '.', '_' or '-', starting with a letter or digit.
func ValidVolumeName(n string) bool {
	if n == "" || len(n) > 64 {
		return false
	}
	for i, c := range n {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || (c != '.' && c != '_' && c != '-')) {
			return false
		}
	}
	return true
}

func volumePath(name string) (string, error) {
	if !ValidVolumeName(name) {
		return "", fmt.Errorf("volume name %q: want 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return filepath.Join(VolumesDir(), name+".ext4"), nil
}

// VolumeInfo describes a volume.
type VolumeInfo struct {
	Name      string    `json:"name"`
	Path      string    `json:"path"`
	SizeBytes int64     `json:"size_bytes"` // capacity
	UsedBytes int64     `json:"used_bytes"` // host disk space taken by the sparse image
	InUse     bool      `json:"in_use"`
	Created   time.Time `json:"created"`
}

// CreateVolume makes a new, empty volume of sizeMiB (0: DefaultVolumeMiB).
func CreateVolume(ctx context.Context, name string, sizeMiB int) (VolumeInfo, error) {
	if sizeMiB == 0 {
		sizeMiB = DefaultVolumeMiB
	}
	if sizeMiB < MinVolumeMiB || sizeMiB > MaxVolumeMiB {
		return VolumeInfo{}, fmt.Errorf("volume size %d MiB: want %d to %d", sizeMiB, MinVolumeMiB, MaxVolumeMiB)
	}
	path, err := volumePath(name)
	if err != nil {
		return VolumeInfo{}, err
	}
	if err := os.MkdirAll(VolumesDir(), 0o700); err != nil {
		return VolumeInfo{}, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if errors.Is(err, os.ErrExist) {
		return VolumeInfo{}, fmt.Errorf("volume %s: %w", name, ErrVolumeExists)
	}
	if err != nil {
		return VolumeInfo{}, fmt.Errorf("volume %s: %w", name, err)
	}
	defer f.Close()
	// Locked while it is being made: nobody attaches a half-made volume.
	unix.Flock(int(f.Fd()), unix.LOCK_EX)
	fail := func(err error) (VolumeInfo, error) {
		os.Remove(path)
		return VolumeInfo{}, fmt.Errorf("volume %s: %w", name, err)
	}
	if err := f.Truncate(int64(sizeMiB) << 20); err != nil {
		return fail(err)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return fail(errors.New("mkfs.ext4 not found: install the e2fsprogs package"))
	}
	// A journal, unlike the throwaway writable layer: a volume must survive
	// its VM being killed.
	out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-m", "0",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0", path).CombinedOutput()
	if err != nil {
		return fail(fmt.Errorf("mkfs.ext4: %v: %s", err, strings.TrimSpace(string(out))))
	}
	return statVolume(name, path)
}

func statVolume(name, path string) (VolumeInfo, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return VolumeInfo{}, fmt.Errorf("volume %s: %w", name, ErrVolumeNotFound)
		}
		return VolumeInfo{}, fmt.Errorf("volume %s: %w", name, err)
	}
	info := VolumeInfo{Name: name, Path: path, SizeBytes: st.Size, UsedBytes: st.Blocks * 512,
		Created: time.Unix(st.Mtim.Sec, 0)}
	if f, err := os.Open(path); err == nil {
		if unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) != nil {
			info.InUse = true
		}
		f.Close()
	}
	return info, nil
}

// GetVolume describes one volume.
func GetVolume(name string) (VolumeInfo, error) {
	path, err := volumePath(name)
	if err != nil {
		return VolumeInfo{}, err
	}
	return statVolume(name, path)
}

// ListVolumes describes every volume, by name.
func ListVolumes() ([]VolumeInfo, error) {
	ents, err := os.ReadDir(VolumesDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []VolumeInfo
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".ext4")
		if !ok || !ValidVolumeName(name) || !e.Type().IsRegular() {
			continue
		}
		if info, err := statVolume(name, filepath.Join(VolumesDir(), e.Name())); err == nil {
			out = append(out, info)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// RemoveVolume deletes a volume and its data. A volume in use is refused.
func RemoveVolume(name string) error {
	path, err := volumePath(name)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("volume %s: %w", name, ErrVolumeNotFound)
	}
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("volume %s: %w", name, ErrVolumeInUse)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	return nil
}

// Attachment is a volume locked for one sandbox.
type Attachment struct {
	Name string
	Path string
	f    *os.File
}

// AttachVolume locks volume name for the caller's sandbox until Release
// (or the process's death). A volume attached elsewhere is refused with
// ErrVolumeInUse.
func AttachVolume(name string) (*Attachment, error) {
	path, err := volumePath(name)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("volume %s: %w (create it with 'matchlock volume create %s')", name, ErrVolumeNotFound, name)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("volume %s: %w", name, ErrVolumeInUse)
	}
	return &Attachment{Name: name, Path: path, f: f}, nil
}

// Release unlocks the volume. Call it only once the VM using it is gone.
func (a *Attachment) Release() error {
	if a == nil || a.f == nil {
		return nil
	}
	err := a.f.Close()
	a.f = nil
	return err
}
