// Command guestcheck runs syscall-level checks of a shared directory inside
// a matchlock guest; the sandbox tests build it statically and copy it in.
//
//	guestcheck semantics DIR          POSIX behaviour real tools rely on
//	guestcheck storm DIR N            N small files in nested dirs: create, stat, read, delete
//	guestcheck race DIR ITERATIONS    read DIR/flip/secret over and over (the host flips it)
//	guestcheck find DIR TOKEN         look for TOKEN through every trick a guest has
//
// Each check prints "ok NAME" or "FAIL NAME: reason"; the exit status is 1
// if any failed.
package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

var failed bool

func check(name string, f func() error) {
	if err := f(); err != nil {
		failed = true
		fmt.Printf("FAIL %s: %v\n", name, err)
		return
	}
	fmt.Printf("ok %s\n", name)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: guestcheck semantics|storm|race|find DIR [ARG]")
		os.Exit(2)
	}
	dir := os.Args[2]
	arg := ""
	if len(os.Args) > 3 {
		arg = os.Args[3]
	}
	switch os.Args[1] {
	case "semantics":
		semantics(dir)
	case "storm":
		n, _ := strconv.Atoi(arg)
		storm(dir, n)
	case "race":
		n, _ := strconv.Atoi(arg)
		race(dir, n)
	case "find":
		find(dir, arg)
	default:
		fmt.Fprintln(os.Stderr, "unknown check", os.Args[1])
		os.Exit(2)
	}
	if failed {
		os.Exit(1)
	}
}

func want(cond bool, format string, args ...any) error {
	if !cond {
		return fmt.Errorf(format, args...)
	}
	return nil
}

func wantErrno(err error, e unix.Errno) error {
	if !errors.Is(err, e) {
		return fmt.Errorf("got %v, want %v", err, e)
	}
	return nil
}

func stat(p string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Lstat(p, &st)
	return st, err
}

func semantics(dir string) {
	p := func(name string) string { return filepath.Join(dir, name) }

	check("rename over an existing file", func() error {
		os.WriteFile(p("r1"), []byte("new"), 0o644)
		os.WriteFile(p("r2"), []byte("old"), 0o644)
		if err := os.Rename(p("r1"), p("r2")); err != nil {
			return err
		}
		b, _ := os.ReadFile(p("r2"))
		_, err := os.Stat(p("r1"))
		return errors.Join(want(string(b) == "new", "r2 is %q", b), want(os.IsNotExist(err), "r1 still there: %v", err))
	})
	check("rename across directories and over an empty directory", func() error {
		os.MkdirAll(p("ra/sub"), 0o755)
		os.MkdirAll(p("rb/empty"), 0o755)
		os.WriteFile(p("ra/sub/f"), []byte("x"), 0o644)
		// (os.Rename refuses a directory target; rename(2) replaces an empty one.)
		if err := unix.Rename(p("ra/sub"), p("rb/empty")); err != nil {
			return err
		}
		b, err := os.ReadFile(p("rb/empty/f"))
		return errors.Join(err, want(string(b) == "x", "moved file is %q", b))
	})
	check("renameat2 NOREPLACE and EXCHANGE", func() error {
		os.WriteFile(p("x1"), []byte("1"), 0o644)
		os.WriteFile(p("x2"), []byte("2"), 0o644)
		e1 := wantErrno(unix.Renameat2(unix.AT_FDCWD, p("x1"), unix.AT_FDCWD, p("x2"), unix.RENAME_NOREPLACE), unix.EEXIST)
		e2 := unix.Renameat2(unix.AT_FDCWD, p("x1"), unix.AT_FDCWD, p("x2"), unix.RENAME_EXCHANGE)
		b, _ := os.ReadFile(p("x1"))
		return errors.Join(e1, e2, want(string(b) == "2", "after exchange x1 is %q", b))
	})
	check("hardlinks", func() error {
		os.WriteFile(p("h1"), []byte("one"), 0o644)
		if err := os.Link(p("h1"), p("h2")); err != nil {
			return err
		}
		s1, _ := stat(p("h1"))
		s2, _ := stat(p("h2"))
		os.WriteFile(p("h2"), []byte("two"), 0o644)
		b, _ := os.ReadFile(p("h1"))
		os.Remove(p("h1"))
		s3, _ := stat(p("h2"))
		return errors.Join(want(s1.Ino == s2.Ino && s1.Nlink == 2, "ino %d/%d nlink %d", s1.Ino, s2.Ino, s1.Nlink),
			want(string(b) == "two", "write via h2 reads %q via h1", b), want(s3.Nlink == 1, "nlink after unlink %d", s3.Nlink))
	})
	check("symlinks", func() error {
		os.WriteFile(p("target"), []byte("T"), 0o644)
		if err := os.Symlink("target", p("sl")); err != nil {
			return err
		}
		l, _ := os.Readlink(p("sl"))
		b, _ := os.ReadFile(p("sl"))
		st, _ := stat(p("sl"))
		return errors.Join(want(l == "target", "readlink %q", l), want(string(b) == "T", "through link %q", b),
			want(st.Mode&unix.S_IFMT == unix.S_IFLNK, "lstat mode %o", st.Mode))
	})
	check("O_APPEND from two descriptors", func() error {
		a, err := os.OpenFile(p("app"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		b, _ := os.OpenFile(p("app"), os.O_WRONLY|os.O_APPEND, 0)
		for i := 0; i < 50; i++ {
			a.WriteString("a")
			b.WriteString("bb")
		}
		a.Close()
		b.Close()
		got, _ := os.ReadFile(p("app"))
		return want(len(got) == 150 && strings.Count(string(got), "a") == 50 && strings.HasPrefix(string(got), "abba"), "content %q", got)
	})
	check("truncate and ftruncate", func() error {
		os.WriteFile(p("t"), []byte("0123456789"), 0o644)
		if err := os.Truncate(p("t"), 4); err != nil {
			return err
		}
		f, _ := os.OpenFile(p("t"), os.O_RDWR, 0)
		defer f.Close()
		if err := f.Truncate(8); err != nil {
			return err
		}
		b, _ := os.ReadFile(p("t"))
		return want(string(b) == "0123\x00\x00\x00\x00", "content %q", b)
	})
	check("O_TRUNC", func() error {
		os.WriteFile(p("ot"), []byte("long content"), 0o644)
		os.WriteFile(p("ot"), []byte("s"), 0o644)
		b, _ := os.ReadFile(p("ot"))
		return want(string(b) == "s", "content %q", b)
	})
	check("fsync and fdatasync of a file and a directory", func() error {
		f, err := os.Create(p("sync"))
		if err != nil {
			return err
		}
		f.WriteString("x")
		e1 := unix.Fsync(int(f.Fd()))
		e2 := unix.Fdatasync(int(f.Fd()))
		f.Close()
		d, err := os.Open(dir)
		if err != nil {
			return err
		}
		defer d.Close()
		return errors.Join(e1, e2, unix.Fsync(int(d.Fd())))
	})
	check("mode bits: setuid, setgid, sticky", func() error {
		os.WriteFile(p("suid"), []byte("#!/bin/sh\n"), 0o755)
		os.Mkdir(p("sticky"), 0o755)
		e1 := os.Chmod(p("suid"), 0o4755|os.ModeSetuid)
		e2 := unix.Chmod(p("suid"), 0o6755)
		e3 := unix.Chmod(p("sticky"), 0o1777)
		s1, _ := stat(p("suid"))
		s2, _ := stat(p("sticky"))
		return errors.Join(e1, e2, e3, want(s1.Mode&0o7777 == 0o6755, "file mode %o", s1.Mode),
			want(s2.Mode&0o7777 == 0o1777, "dir mode %o", s2.Mode))
	})
	check("ownership shows the mount owner; chown to it works, to others EPERM", func() error {
		os.WriteFile(p("own"), nil, 0o644)
		st, _ := stat(p("own"))
		e1 := os.Chown(p("own"), int(st.Uid), int(st.Gid))
		e2 := wantErrno(os.Chown(p("own"), int(st.Uid)+4242, -1), unix.EPERM)
		return errors.Join(e1, e2)
	})
	check("mtime and atime", func() error {
		os.WriteFile(p("times"), nil, 0o644)
		ts := []unix.Timespec{{Sec: 1000000000, Nsec: 123456789}, {Sec: 1500000000, Nsec: 987654321}}
		if err := unix.UtimesNano(p("times"), ts); err != nil {
			return err
		}
		st, _ := stat(p("times"))
		e1 := want(st.Atim == ts[0] && st.Mtim == ts[1], "atime %v mtime %v", st.Atim, st.Mtim)
		now := time.Now().Unix()
		unix.UtimesNano(p("times"), []unix.Timespec{{Nsec: unix.UTIME_NOW}, {Nsec: unix.UTIME_NOW}})
		st, _ = stat(p("times"))
		e2 := want(st.Mtim.Sec >= now-5 && st.Mtim.Sec <= now+5, "touch: mtime %d, now %d", st.Mtim.Sec, now)
		// A write moves mtime forward (from a time set in the past).
		unix.UtimesNano(p("times"), ts)
		f, _ := os.OpenFile(p("times"), os.O_WRONLY, 0)
		f.WriteString("x")
		f.Close()
		st, _ = stat(p("times"))
		e3 := want(st.Mtim.Sec >= now-5, "mtime after write %v, want about %d", st.Mtim, now)
		return errors.Join(e1, e2, e3)
	})
	check("sparse file past 4 GiB", func() error {
		f, err := os.Create(p("big"))
		if err != nil {
			return err
		}
		defer f.Close()
		const off = 5<<30 + 123
		if _, err := f.WriteAt([]byte("tail"), off); err != nil {
			return err
		}
		st, _ := stat(p("big"))
		buf := make([]byte, 4)
		g, _ := os.Open(p("big"))
		defer g.Close()
		_, err = g.ReadAt(buf, off)
		zero := make([]byte, 4)
		g.ReadAt(zero, 4<<30)
		hole, _ := unix.Seek(int(g.Fd()), 0, unix.SEEK_HOLE)
		return errors.Join(err, want(st.Size == off+4, "size %d", st.Size), want(string(buf) == "tail", "read %q", buf),
			want(bytes.Equal(zero, make([]byte, 4)), "hole reads %q", zero), want(hole < off, "SEEK_HOLE %d", hole),
			want(st.Blocks*512 < 64<<20, "not sparse: %d blocks", st.Blocks))
	})
	check("mmap reads and shared writes", func() error {
		data := bytes.Repeat([]byte("mmap-data-"), 100000) // 1 MB
		os.WriteFile(p("mm"), data, 0o644)
		f, err := os.OpenFile(p("mm"), os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		m, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return err
		}
		e1 := want(bytes.Equal(m, data), "mapped bytes differ")
		copy(m[10:], "WRITTEN")
		e2 := unix.Msync(m, unix.MS_SYNC)
		unix.Munmap(m)
		b, _ := os.ReadFile(p("mm"))
		return errors.Join(e1, e2, want(string(b[10:17]) == "WRITTEN", "after msync %q", b[10:17]))
	})
	check("xattrs (user.*)", func() error {
		os.WriteFile(p("xa"), nil, 0o644)
		if err := unix.Setxattr(p("xa"), "user.k", []byte("v1"), 0); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, e1 := unix.Getxattr(p("xa"), "user.k", buf)
		ln, e2 := unix.Listxattr(p("xa"), buf[:])
		list := string(buf[:max(ln, 0)])
		e3 := unix.Removexattr(p("xa"), "user.k")
		_, e4 := unix.Getxattr(p("xa"), "user.k", buf)
		e5 := unix.Setxattr(p("xa"), "trusted.k", []byte("v"), 0)
		return errors.Join(e1, e2, e3, want(n == 2, "getxattr %d", n), want(strings.Contains(list, "user.k"), "list %q", list),
			wantErrno(e4, unix.ENODATA), want(e5 != nil, "trusted.* xattr accepted"))
	})
	check("a directory of 1000 entries lists each once", func() error {
		os.Mkdir(p("many"), 0o755)
		for i := 0; i < 1000; i++ {
			if err := os.WriteFile(p(fmt.Sprintf("many/file-with-a-longish-name-%04d", i)), nil, 0o644); err != nil {
				return err
			}
		}
		ents, err := os.ReadDir(p("many"))
		seen := map[string]bool{}
		for _, e := range ents {
			seen[e.Name()] = true
		}
		return errors.Join(err, want(len(ents) == 1000 && len(seen) == 1000, "%d entries, %d distinct", len(ents), len(seen)))
	})
	check("unlinked but open", func() error {
		os.WriteFile(p("ghost"), []byte("boo"), 0o644)
		f, err := os.Open(p("ghost"))
		if err != nil {
			return err
		}
		defer f.Close()
		os.Remove(p("ghost"))
		b, err := io.ReadAll(f)
		var st unix.Stat_t
		e2 := unix.Fstat(int(f.Fd()), &st)
		return errors.Join(err, e2, want(string(b) == "boo", "read %q", b))
	})
	check("fallocate", func() error {
		f, err := os.Create(p("fa"))
		if err != nil {
			return err
		}
		defer f.Close()
		e1 := unix.Fallocate(int(f.Fd()), 0, 0, 1<<20)
		st, _ := stat(p("fa"))
		return errors.Join(e1, want(st.Size == 1<<20, "size %d", st.Size))
	})
	check("FIFOs work in the guest; device nodes are refused", func() error {
		if err := unix.Mkfifo(p("fifo"), 0o644); err != nil {
			return err
		}
		r, err := os.OpenFile(p("fifo"), os.O_RDONLY|unix.O_NONBLOCK, 0)
		if err != nil {
			return err
		}
		defer r.Close()
		w, err := os.OpenFile(p("fifo"), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		w.WriteString("pipe")
		w.Close()
		buf := make([]byte, 8)
		n, _ := r.Read(buf)
		e := unix.Mknod(p("dev"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
		return errors.Join(want(string(buf[:n]) == "pipe", "fifo read %q", buf[:n]), want(e != nil, "mknod of a device succeeded"))
	})
	check("statfs", func() error {
		var sf unix.Statfs_t
		if err := unix.Statfs(dir, &sf); err != nil {
			return err
		}
		return want(sf.Bsize > 0 && sf.Blocks > 0, "statfs %+v", sf)
	})
	check("64 MiB sequential write and read back", func() error {
		data := make([]byte, 64<<20)
		for i := range data {
			data[i] = byte(i*7 + i>>12)
		}
		if err := os.WriteFile(p("seq"), data, 0o644); err != nil {
			return err
		}
		b, err := os.ReadFile(p("seq"))
		return errors.Join(err, want(sha256.Sum256(b) == sha256.Sum256(data), "content differs (%d bytes)", len(b)))
	})
}

// storm is the npm-install pattern: many small files in nested dirs.
func storm(dir string, n int) {
	root := filepath.Join(dir, "storm")
	var paths []string
	for i := 0; i < n; i++ {
		paths = append(paths, filepath.Join(root, fmt.Sprintf("pkg%02d", i%50), fmt.Sprintf("lib%d", i/50%4), fmt.Sprintf("file%d.js", i)))
	}
	t0 := time.Now()
	check(fmt.Sprintf("create %d files", n), func() error {
		for i, pth := range paths {
			if err := os.MkdirAll(filepath.Dir(pth), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(pth, []byte(fmt.Sprintf("module.exports = %d;\n", i)), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	t1 := time.Now()
	check("stat and read them", func() error {
		for i, pth := range paths {
			b, err := os.ReadFile(pth)
			if err != nil {
				return err
			}
			if string(b) != fmt.Sprintf("module.exports = %d;\n", i) {
				return fmt.Errorf("%s: %q", pth, b)
			}
		}
		var count int
		err := filepath.Walk(root, func(_ string, fi os.FileInfo, err error) error {
			if err == nil && fi.Mode().IsRegular() {
				count++
			}
			return err
		})
		return errors.Join(err, want(count == n, "walk found %d files", count))
	})
	t2 := time.Now()
	check("delete them", func() error { return os.RemoveAll(root) })
	t3 := time.Now()
	fmt.Printf("storm: %d files: create %.0f/s, read+walk %.0f/s, delete %.0f/s\n", n,
		float64(n)/t1.Sub(t0).Seconds(), float64(n)/t2.Sub(t1).Seconds(), float64(n)/t3.Sub(t2).Seconds())
}

// race reads DIR/flip/secret while the host swaps DIR/flip between a
// directory and a symlink to the outside: it must only ever read "inside"
// (the guest kernel resolves the symlink in the guest, where the host's
// outside directory does not exist).
func race(dir string, n int) {
	var inside, other int
	check("race", func() error {
		for i := 0; i < n; i++ {
			b, err := os.ReadFile(filepath.Join(dir, "flip", "secret"))
			if err != nil {
				other++
				continue
			}
			if strings.Contains(string(b), "TOKEN") {
				return fmt.Errorf("read the outside file after %d tries", i)
			}
			inside++
			os.WriteFile(filepath.Join(dir, "flip", "w"), []byte("x"), 0o644)
		}
		return nil
	})
	fmt.Printf("race: %d inside reads, %d misses\n", inside, other)
}

// find hunts for token everywhere a guest could hope to reach host files
// through the share: dot-dot, symlinks (planted by the host), hardlinks.
func find(dir, token string) {
	var seen []string
	look := func(p string) {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(token)) {
			seen = append(seen, p)
		}
	}
	for _, p := range []string{"../outside/secret", "../../outside/secret", "../../../../../../outside/secret",
		"up/secret", "abs/secret", "rel/secret", "root" + "/outside/secret", "file"} {
		look(filepath.Join(dir, p))
	}
	// Hardlink whatever the links point at, then read the link.
	for _, name := range []string{"up", "abs", "rel", "root", "file"} {
		os.Link(filepath.Join(dir, name), filepath.Join(dir, "hl-"+name))
		look(filepath.Join(dir, "hl-"+name))
		unix.Linkat(unix.AT_FDCWD, filepath.Join(dir, name), unix.AT_FDCWD, filepath.Join(dir, "hlf-"+name), unix.AT_SYMLINK_FOLLOW)
		look(filepath.Join(dir, "hlf-"+name))
	}
	// Walk everything reachable, following symlinks one level.
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			look(p)
		}
		if err == nil && fi.Mode()&os.ModeSymlink != 0 {
			look(p)
			ents, _ := os.ReadDir(p)
			for _, e := range ents {
				look(filepath.Join(p, e.Name()))
			}
		}
		return nil
	})
	sort.Strings(seen)
	check("find "+token, func() error { return want(len(seen) == 0, "token visible at %v", seen) })
}
