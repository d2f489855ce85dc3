package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
)

var errWriterStopped = errors.New("ext4 writer stopped")

// WriteExt4 flattens layers (lowest first) into a compact ext4 filesystem
// written to f from offset 0. The image is sized to its contents (plus
// metadata), meant to be mounted read-only. Ownership, modes, symlinks, hard
// links, device nodes and xattrs come from the tar headers, whoever the
// caller is; nothing is extracted to the host.
func WriteExt4(ctx context.Context, layers []Opener, f io.ReadWriteSeeker, lim Limits) (Stats, error) {
	lim = lim.withDefaults()
	t, err := scan(ctx, layers, lim)
	if err != nil {
		return Stats{}, err
	}
	pr, pw := io.Pipe()
	type result struct {
		stats Stats
		err   error
	}
	done := make(chan result, 1)
	go func() {
		st, err := t.emit(ctx, layers, pw)
		pw.CloseWithError(err)
		done <- result{st, err}
	}()
	// The metadata reserved is sized for the largest disk the limits allow.
	maxDisk := lim.MaxBytes + lim.MaxBytes/8 + 256<<20
	convErr := tar2ext4.ConvertTarToExt4(pr, f, tar2ext4.MaximumDiskSize(maxDisk))
	pr.CloseWithError(errWriterStopped)
	res := <-done
	if res.err != nil && !errors.Is(res.err, errWriterStopped) {
		return Stats{}, res.err
	}
	if convErr != nil {
		return Stats{}, fmt.Errorf("write ext4: %w", convErr)
	}
	if err := setInodeBitmapPadding(f); err != nil {
		return Stats{}, fmt.Errorf("write ext4: %w", err)
	}
	return res.stats, nil
}
