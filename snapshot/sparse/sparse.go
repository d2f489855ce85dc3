// Package sparse copies files without filling their holes: only the data
// extents of the source (SEEK_DATA/SEEK_HOLE) are read, with
// copy_file_range(2) when the kernel can do it in place (same filesystem)
// and read/write otherwise. In the read/write path, pages that are all
// zeros are skipped too, so a copy of guest RAM keeps the holes of pages the
// guest never wrote. This filesystem has no reflinks, so a copy costs the
// data it holds, not the file's size.
package sparse

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

const (
	bufSize  = 1 << 20
	pageSize = 4096
)

var zeroPage [pageSize]byte

// CopyFile copies the file src to dst (created with mode 0600; it must not
// exist). It returns the number of data bytes written.
func CopyFile(dst, src string) (int64, error) {
	f, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return Copy(dst, f)
}

// Copy copies the whole of src (read with pread, its offset is not used)
// to a new file dst, which ends up with src's size and holes.
func Copy(dst string, src *os.File) (int64, error) {
	fi, err := src.Stat()
	if err != nil {
		return 0, err
	}
	size := fi.Size()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := copyExtents(out, src, size)
	if err == nil {
		err = out.Truncate(size)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return 0, fmt.Errorf("copy %s: %w", src.Name(), err)
	}
	return n, nil
}

func copyExtents(out, in *os.File, size int64) (int64, error) {
	var total int64
	inFD, outFD := int(in.Fd()), int(out.Fd())
	useCFR := true
	var buf []byte
	for off := int64(0); off < size; {
		data, err := unix.Seek(inFD, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			// No SEEK_DATA support: treat the rest as data.
			data = off
		}
		hole, err := unix.Seek(inFD, data, unix.SEEK_HOLE)
		if err != nil || hole > size {
			hole = size
		}
		for pos := data; pos < hole; {
			if useCFR {
				roff, woff := pos, pos
				n, err := unix.CopyFileRange(inFD, &roff, outFD, &woff, int(min(hole-pos, 1<<30)), 0)
				if err == nil && n > 0 {
					pos += int64(n)
					total += int64(n)
					continue
				}
				if err == nil { // n == 0: unexpected end of the source
					return total, io.ErrUnexpectedEOF
				}
				if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) &&
					!errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EBADF) {
					return total, err
				}
				useCFR = false
			}
			if buf == nil {
				buf = make([]byte, bufSize)
			}
			n, err := in.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 && err != nil {
				return total, err
			}
			w, err := writeNonZero(out, buf[:n], pos)
			total += w
			if err != nil {
				return total, err
			}
			pos += int64(n)
		}
		off = hole
	}
	return total, nil
}

// writeNonZero writes b at off, skipping whole pages of zeros.
func writeNonZero(out *os.File, b []byte, off int64) (int64, error) {
	var written int64
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && !isZero(b[j:min(j+pageSize, len(b))]) {
			j += pageSize
		}
		j = min(j, len(b))
		if j > i {
			n, err := out.WriteAt(b[i:j], off+int64(i))
			written += int64(n)
			if err != nil {
				return written, err
			}
		}
		i = j + pageSize // b[j:j+pageSize] is zero (or past the end)
	}
	return written, nil
}

func isZero(p []byte) bool {
	return len(p) == pageSize && string(p) == string(zeroPage[:]) || len(p) < pageSize && allZero(p)
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
