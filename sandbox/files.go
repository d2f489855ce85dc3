package sandbox

import (
	"context"
	"fmt"
	"io"
	"os"

	"matchlock.dev/matchlock/guest/proto"
)

// FileInfo describes a guest file in a listing.
type FileInfo = proto.FileInfo

// WriteFile streams r into path in the guest (created or truncated, with
// mode's permission bits). Data moves in flow-controlled chunks: the size
// of the file does not bound host memory.
func (s *Sandbox) WriteFile(ctx context.Context, path string, r io.Reader, mode os.FileMode) (int64, error) {
	st, err := s.OpenStream(ctx, proto.Encode(proto.OpenHeader{Kind: proto.KindWriteFile,
		File: &proto.FileRequest{Path: path, Mode: uint32(mode.Perm() | mode&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky))}}))
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	defer st.Close()
	w := st.Writer(proto.Stdin)
	if _, err := io.Copy(w, r); err != nil {
		st.Reset("write aborted")
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	w.Close()
	m, err := recvResult(ctx, st)
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	return m.Size, nil
}

// ReadFile streams the guest file at path into w.
func (s *Sandbox) ReadFile(ctx context.Context, path string, w io.Writer) (int64, error) {
	st, err := s.OpenStream(ctx, proto.Encode(proto.OpenHeader{Kind: proto.KindReadFile, File: &proto.FileRequest{Path: path}}))
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	defer st.Close()
	n, cerr := io.Copy(w, st.Reader(proto.Stdout))
	if cerr != nil {
		st.Reset("read aborted")
	}
	m, err := recvResult(ctx, st)
	if err != nil {
		return n, fmt.Errorf("read %s: %w", path, err)
	}
	if cerr != nil {
		return n, fmt.Errorf("read %s: %w", path, cerr)
	}
	if m.Size != n {
		return n, fmt.Errorf("read %s: got %d bytes, guest sent %d", path, n, m.Size)
	}
	return n, nil
}

// ListFiles lists a guest directory.
func (s *Sandbox) ListFiles(ctx context.Context, path string) ([]FileInfo, error) {
	m, err := s.call(ctx, proto.OpenHeader{Kind: proto.KindListFiles, File: &proto.FileRequest{Path: path}})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", path, err)
	}
	return m.Files, nil
}
