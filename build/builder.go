package build

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/internal/paths"
)

// BuilderCacheDir is where scripts/build-builder.sh leaves builder images:
// $MATCHLOCK_BUILDER_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/matchlock/builder.
// It deliberately ignores $MATCHLOCK_CACHE, so that test runs with a
// private cache share the (expensive) builder image.
func BuilderCacheDir() string {
	if d := os.Getenv("MATCHLOCK_BUILDER_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "matchlock", "builder")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/tmp"
	}
	return filepath.Join(home, ".cache", "matchlock", "builder")
}

// BuilderImage makes sure the builder image is in the store and returns
// its tag, matchlock-builder:<hash>. The image comes from $MATCHLOCK_BUILDER
// (a rootfs tar) or BuilderCacheDir()/current/builder.tar.
func BuilderImage(ctx context.Context, st *image.Store) (string, error) {
	tarPath := os.Getenv("MATCHLOCK_BUILDER")
	if tarPath == "" {
		tarPath = filepath.Join(BuilderCacheDir(), "current", "builder.tar")
	}
	real, err := filepath.EvalSymlinks(tarPath)
	if err != nil {
		return "", fmt.Errorf("no builder image at %s: run scripts/build-builder.sh (it assembles it from Debian packages and BuildKit, ~2 min once)", tarPath)
	}
	hash := filepath.Base(filepath.Dir(real))
	if !validHash(hash) {
		fi, err := os.Stat(real)
		if err != nil {
			return "", err
		}
		hash = fmt.Sprintf("%x%x", fi.Size(), fi.ModTime().Unix())
	}
	tag := "matchlock-builder:" + hash
	if _, err := st.Resolve(tag); err == nil {
		return tag, nil
	} else if !errors.Is(err, image.ErrNotFound) {
		return "", err
	}
	f, err := os.Open(real)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := st.Import(ctx, tag, f); err != nil {
		return "", fmt.Errorf("builder image: %w", err)
	}
	return tag, nil
}

func validHash(s string) bool {
	if len(s) < 8 || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// CacheDir holds the BuildKit cache disk and its lock: StateDir/builder.
func CacheDir() string { return filepath.Join(paths.StateDir(), "builder") }

// CacheDiskMiB is the size limit of the BuildKit cache disk (sparse).
const CacheDiskMiB = 10 << 10

// gcKeepMB is what BuildKit's garbage collector keeps of the cache disk.
const gcKeepMB = 8000

// cacheLock is the exclusive hold on the cache disk: one build at a time.
type cacheLock struct{ f *os.File }

// lockCache takes the builder lock, waiting for a running build (telling
// notice once), and creates the cache disk when missing.
func lockCache(ctx context.Context, notice func(string), create bool) (*cacheLock, string, error) {
	dir := CacheDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", err
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, "", err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if notice != nil {
			notice("waiting for another build to finish (one build at a time uses the builder cache)")
		}
		for {
			if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				f.Close()
				return nil, "", ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	l := &cacheLock{f: f}
	disk := filepath.Join(dir, "cache.ext4")
	if _, err := os.Stat(disk); create && os.IsNotExist(err) {
		if err := makeCacheDisk(ctx, disk); err != nil {
			l.release()
			return nil, "", err
		}
	}
	return l, disk, nil
}

func (l *cacheLock) release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

func makeCacheDisk(ctx context.Context, path string) error {
	tmp := path + ".tmp"
	os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("build cache disk: %w", err)
	}
	err = f.Truncate(int64(CacheDiskMiB) << 20)
	f.Close()
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("build cache disk: %w", err)
	}
	// With a journal: the cache must survive a killed builder VM.
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "buildkit",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0", tmp).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("format build cache disk: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return os.Rename(tmp, path)
}

// Prune resets the BuildKit cache: the cache disk is deleted (it is made
// anew, empty, by the next build). It waits for a running build.
func Prune(ctx context.Context, notice func(string)) (freed int64, err error) {
	l, disk, err := lockCache(ctx, notice, false)
	if err != nil {
		return 0, err
	}
	defer l.release()
	var st unix.Stat_t
	if unix.Stat(disk, &st) == nil {
		freed = st.Blocks * 512
	}
	if err := os.Remove(disk); err != nil && !os.IsNotExist(err) {
		return 0, err
	}
	return freed, nil
}
