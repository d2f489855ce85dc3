package rootfs

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// convert runs WriteExt4 into a fresh temp dir and checks afterwards that
// the dir holds nothing but the image: a conversion never writes elsewhere.
func convert(t *testing.T, lim Limits, layers ...Opener) (string, Stats, error) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "rootfs.ext4")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	st, err := WriteExt4(context.Background(), layers, f, lim)
	f.Close()
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("conversion left %d files in its dir", len(ents))
	}
	return img, st, err
}

// The hostile corpus: archives that try to write outside the image, loop,
// lie about sizes, or are simply broken. Each must either convert with every
// name inside the image or fail with the expected error; none may panic or
// touch the host.
func TestHostileArchives(t *testing.T) {
	canary := fmt.Sprintf("matchlock-escape-%d", os.Getpid())
	hostPath := filepath.Join(os.TempDir(), canary)
	defer os.Remove(hostPath)
	up := strings.Repeat("../", 30)

	type want struct {
		err   error             // nil: must convert
		files map[string]string // path in the image -> content
		gone  []string          // must not be in the image
	}
	bomb := func() []byte { // 64 MiB of zeros in one entry, gzip'ed to ~64 KiB
		var raw bytes.Buffer
		tw := tar.NewWriter(&raw)
		tw.WriteHeader(&tar.Header{Name: "zeros", Typeflag: tar.TypeReg, Mode: 0o644, Size: 64 << 20})
		tw.Write(make([]byte, 64<<20))
		tw.Close()
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(raw.Bytes())
		zw.Close()
		return gz.Bytes()
	}()
	valid := layerTar(t, file("etc/hostname", "box"), file("big", strings.Repeat("x", 4096)))
	hugePAX := func() []byte { // a 2 MiB PAX record, which Go's writer refuses to make
		rec := "SCHILY.xattr.user.big=" + strings.Repeat("A", 2<<20) + "\n"
		rec = fmt.Sprintf("%d %s", len(rec)+8, rec)
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		tw.WriteHeader(&tar.Header{Name: "PaxHeaders/f", Typeflag: tar.TypeReg, Size: int64(len(rec))})
		io.WriteString(tw, rec)
		tw.WriteHeader(&tar.Header{Name: "f", Typeflag: tar.TypeReg})
		tw.Close()
		raw := b.Bytes()
		setTypeflag(raw[:512], tar.TypeXHeader)
		return raw
	}()
	lyingSize := func() []byte { // claims a 1 TiB file, holds none of it
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		tw.WriteHeader(&tar.Header{Name: "huge", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1 << 40})
		return b.Bytes()
	}()
	manyEntries := func() []byte {
		var es []entry
		for i := 0; i < 300; i++ {
			es = append(es, file(fmt.Sprintf("f%d", i), ""))
		}
		return layerTar(t, es...)
	}()
	gunzip := func(b []byte) Opener {
		return func() (io.ReadCloser, error) {
			zr, err := gzip.NewReader(bytes.NewReader(b))
			return io.NopCloser(zr), err
		}
	}

	cases := []struct {
		name   string
		lim    Limits
		layers []Opener
		want   want
	}{
		{"dotdot paths", Limits{}, openers(layerTar(t,
			file(up+"tmp/"+canary, "escaped"),
			file("a/b/"+up+"etc/passwd", "root:x:0:0"),
		)), want{files: map[string]string{"/tmp/" + canary: "escaped", "/etc/passwd": "root:x:0:0"}}},
		{"absolute paths", Limits{}, openers(layerTar(t,
			file("/etc/shadow", "s"),
			file("//usr///lib/./x", "x"),
		)), want{files: map[string]string{"/etc/shadow": "s", "/usr/lib/x": "x"}}},
		{"symlinked parent pointing out", Limits{}, openers(
			layerTar(t, symlink("out", up+"tmp"), symlink("abs", "/"), symlink("file", "/etc/hostname"),
				file("etc/hostname", "box")),
			layerTar(t, file("out/"+canary, "through out"), file("abs/etc/motd", "m"), file("file/x", "?")),
		), want{files: map[string]string{"/tmp/" + canary: "through out", "/etc/motd": "m"}, gone: []string{"/file/x"}}},
		{"hard links pointing out", Limits{}, openers(layerTar(t,
			file("etc/hostname", "box"),
			hardlink("h1", up+"etc/hostname"), // cleaned into the image
			hardlink("h2", "/etc/hostname"),   // absolute: the image's file
			hardlink("h3", up+"etc/no-such"),  // nothing to link to: skipped
			hardlink("h4", "etc"),             // a directory: skipped
			hardlink("h5", "h5"),              // itself: skipped
		)), want{files: map[string]string{"/h1": "box", "/h2": "box"}, gone: []string{"/h3", "/h4", "/h5"}}},
		{"duplicate entries", Limits{}, openers(layerTar(t,
			file("dup", "1"), file("dup", "2"), dir("dup2/"), file("dup2", "file"), file("./dup", "3"),
		)), want{files: map[string]string{"/dup": "3", "/dup2": "file"}}},
		{"symlink loop", Limits{}, openers(layerTar(t,
			symlink("a", "b"), symlink("b", "a"), symlink("self", "self"), file("a/x", "?"), file("self/y", "?"),
		)), want{gone: []string{"/x", "/y"}}},
		{"truncated header", Limits{}, openers(valid[:1024+300]), want{err: ErrInvalid}},
		{"truncated body", Limits{}, openers(valid[:len(valid)-2048]), want{err: ErrInvalid}},
		{"garbage", Limits{}, openers(bytes.Repeat([]byte("not a tar!"), 100)), want{err: ErrInvalid}},
		{"huge pax header", Limits{}, openers(hugePAX), want{err: ErrInvalid}},
		{"lying size", Limits{}, openers(lyingSize), want{err: ErrTooLarge}},
		{"decompression bomb", Limits{MaxBytes: 8 << 20}, []Opener{gunzip(bomb)}, want{err: ErrTooLarge}},
		{"bomb over layers", Limits{MaxBytes: 100 << 20}, []Opener{gunzip(bomb), gunzip(bomb)}, want{err: ErrTooLarge}},
		{"too many entries", Limits{MaxEntries: 100}, openers(manyEntries), want{err: ErrTooManyEntries}},
		{"long component", Limits{}, openers(layerTar(t, file(strings.Repeat("n", 256), "x"))), want{err: ErrInvalid}},
		{"owner out of range", Limits{}, openers(layerTar(t, entry{name: "u", typ: tar.TypeReg, uid: 1 << 40})), want{err: ErrInvalid}},
		{"empty layer", Limits{}, openers(nil), want{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img, _, err := convert(t, c.lim, c.layers...)
			if c.want.err != nil {
				if !errors.Is(err, c.want.err) {
					t.Fatalf("got error %v, want %v", err, c.want.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("convert: %v", err)
			}
			for p, body := range c.want.files {
				if got := cat(t, img, p); got != body {
					t.Errorf("%s = %q, want %q", p, got, body)
				}
			}
			for _, p := range c.want.gone {
				if exists(t, img, p) {
					t.Errorf("%s is in the image", p)
				}
			}
		})
	}
	if _, err := os.Lstat(hostPath); err == nil {
		t.Fatalf("%s was written on the host", hostPath)
	}
}

func TestCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var buf bytes.Buffer
	_, err := Flatten(ctx, openers(layerTar(t, file("a", "b"))), &buf, Limits{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// setTypeflag rewrites the type of a raw ustar header block and its checksum
// (the sum of all header bytes, the checksum field counted as spaces).
func setTypeflag(blk []byte, typ byte) {
	blk[156] = typ
	copy(blk[148:156], "        ")
	sum := 0
	for _, c := range blk[:512] {
		sum += int(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
}
