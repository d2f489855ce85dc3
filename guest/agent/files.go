package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"matchlock.dev/matchlock/guest/proto"
)

func fileErrCode(err error) string {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return proto.ErrCodeNotFound
	case errors.Is(err, os.ErrPermission):
		return proto.ErrCodePermission
	}
	return proto.ErrCodeInternal
}

func readFile(st *proto.Stream, req *proto.FileRequest) {
	f, err := os.Open(req.Path)
	if err != nil {
		sendError(st, fileErrCode(err), err)
		return
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.IsDir() {
		sendError(st, proto.ErrCodeInvalid, fmt.Errorf("read %s: is a directory", req.Path))
		return
	}
	n, err := io.Copy(st.Writer(proto.Stdout), f)
	if err != nil {
		st.Reset(fmt.Sprintf("read %s: %v", req.Path, err))
		return
	}
	st.CloseWrite(proto.Stdout)
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult, Size: n}))
}

func writeFile(st *proto.Stream, req *proto.FileRequest) {
	mode := os.FileMode(req.Mode & 0o7777)
	if mode == 0 {
		mode = 0o644
	}
	if !filepath.IsAbs(req.Path) {
		sendError(st, proto.ErrCodeInvalid, fmt.Errorf("write %s: path must be absolute", req.Path))
		return
	}
	if err := os.MkdirAll(filepath.Dir(req.Path), 0o755); err != nil {
		sendError(st, fileErrCode(err), err)
		return
	}
	f, err := os.OpenFile(req.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		sendError(st, fileErrCode(err), err)
		return
	}
	n, err := io.Copy(f, st.Reader(proto.Stdin))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		sendError(st, fileErrCode(err), fmt.Errorf("write %s: %w", req.Path, err))
		return
	}
	os.Chmod(req.Path, mode)
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult, Size: n}))
}

func listFiles(st *proto.Stream, req *proto.FileRequest) {
	ents, err := os.ReadDir(req.Path)
	if err != nil {
		sendError(st, fileErrCode(err), err)
		return
	}
	// Stay well inside one Msg frame: a huge directory is truncated
	// rather than overflowing MaxPayload.
	var out []proto.FileInfo
	budget := proto.MaxPayload - 1024
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			continue
		}
		budget -= len(e.Name()) + 80
		if budget < 0 {
			break
		}
		out = append(out, proto.FileInfo{Name: e.Name(), Size: fi.Size(), Mode: uint32(fi.Mode().Perm()), IsDir: fi.IsDir(), MTime: fi.ModTime().Unix()})
	}
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult, Files: out}))
}
