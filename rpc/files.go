package rpc

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"strings"

	"matchlock.dev/matchlock/sandbox"
)

// readChunk is the most one read_file_chunk notification carries.
const readChunk = 256 << 10

// --- write_file_open / write_file_chunk / write_file_close ------------------

// writeHandle is one file being written. Its bytes go read loop → sink →
// pipe → sandbox.WriteFile → guest, each step blocking on the next, so the
// host holds at most the sink's queue of a file, whatever its size.
type writeHandle struct {
	id   string
	path string
	sink *sink
	pw   *io.PipeWriter
	// hash and n are used by the sink's worker only.
	hash hash.Hash
	n    int64
	res  chan writeResult // the WriteFile outcome, sent once
	// cancel ends the handle: its cause is what queued chunks are told.
	cancel context.CancelCauseFunc
}

type writeResult struct {
	n   int64
	err error
}

// hashWriter is the sink's writer for a write handle.
type hashWriter struct{ h *writeHandle }

func (w hashWriter) Write(p []byte) (int, error) {
	n, err := w.h.pw.Write(p)
	w.h.hash.Write(p[:n])
	w.h.n += int64(n)
	return n, err
}

func (w hashWriter) Close() error { return w.h.pw.Close() }

type writeOpenParams struct {
	ID   string  `json:"id"`
	Path string  `json:"path"`
	Mode *uint32 `json:"mode"` // permission bits as a number (420 = 0644); default 0644
}

var errAborted = errorf(CodeCancelled, "write aborted by the client")

func handleWriteOpen(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	var p writeOpenParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	if err := validPath(p.Path); err != nil {
		return nil, err
	}
	mode := os.FileMode(0o644)
	if p.Mode != nil {
		if *p.Mode > 0o7777 {
			return nil, errorf(CodeInvalidParams, `invalid params: "mode" %#o: want permission bits, at most 0o7777`, *p.Mode)
		}
		mode = os.FileMode(*p.Mode & 0o777)
		if *p.Mode&0o4000 != 0 {
			mode |= os.ModeSetuid
		}
		if *p.Mode&0o2000 != 0 {
			mode |= os.ModeSetgid
		}
		if *p.Mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
	}
	if p.ID == "" {
		return nil, errorf(CodeInvalidParams, `invalid params: "id" (the sandbox id) is required`)
	}

	s.mu.Lock()
	e := s.sandboxes[p.ID]
	switch {
	case e == nil:
		s.mu.Unlock()
		return nil, errorf(CodeUnknownSandbox, "no sandbox %q in this session", p.ID)
	case len(s.handles) >= s.cfg.MaxHandles:
		s.mu.Unlock()
		return nil, errorf(CodeLimit, "too many files open for writing (limit %d): close some first", s.cfg.MaxHandles)
	}
	s.nextH++
	pr, pw := io.Pipe()
	h := &writeHandle{id: fmt.Sprintf("wf-%d", s.nextH), path: p.Path, sink: newSink(s), pw: pw,
		hash: sha256.New(), res: make(chan writeResult, 1)}
	s.handles[h.id] = h
	s.wg.Add(1)
	s.mu.Unlock()

	// The handle lives until close, abort, or the end of its sandbox.
	hctx, hcancel := context.WithCancelCause(e.ctx)
	h.cancel = hcancel
	context.AfterFunc(hctx, func() {
		why := s.toError(hctx, context.Cause(hctx))
		pw.CloseWithError(why)
		s.dropHandle(h.id)
		h.sink.close(why)
	})
	h.sink.finish = func(it sinkItem) {
		pw.Close()
		r := <-h.res
		s.dropHandle(h.id)
		hcancel(nil)
		if r.err == nil && r.n != h.n {
			r.err = fmt.Errorf("write %s: the guest wrote %d bytes of %d", h.path, r.n, h.n)
		}
		if r.err != nil {
			h.sink.answer(it, nil, s.toError(context.Background(), r.err))
			return
		}
		h.sink.answer(it, map[string]any{"size": r.n, "sha256": hex.EncodeToString(h.hash.Sum(nil))}, nil)
	}
	h.sink.start(hashWriter{h})
	go func() {
		defer s.wg.Done()
		n, err := e.sb.WriteFile(hctx, p.Path, pr, mode)
		if err == nil {
			err = io.ErrClosedPipe // stops writers if the guest finished early
		}
		pr.CloseWithError(err)
		if err == io.ErrClosedPipe {
			err = nil
		}
		h.res <- writeResult{n, err}
	}()
	return map[string]string{"handle": h.id}, nil
}

func (s *session) dropHandle(id string) *writeHandle {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.handles[id]
	delete(s.handles, id)
	return h
}

// lockHandle locks s.mu and returns the open write handle id, for the
// caller to unlock. If there is none it unlocks, answers req with an error
// and returns nil.
func (s *session) lockHandle(req *request, id string) *writeHandle {
	s.mu.Lock()
	h := s.handles[id]
	if h == nil {
		s.mu.Unlock()
		s.reply(req, nil, errorf(CodeUnknownRequest, "no open write handle %q", id))
	}
	return h
}

type writeChunkParams struct {
	Handle string `json:"handle"`
	Data   []byte `json:"data"` // base64
}

func handleWriteChunk(s *session, req *request) {
	var p writeChunkParams
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	h := s.lockHandle(req, p.Handle)
	if h == nil {
		return
	}
	err := h.sink.enqueue(req, sinkItem{data: p.Data})
	s.mu.Unlock()
	if err != nil {
		if req.isNotification() {
			s.abortHandle(h, err) // a hole in the file must not go unnoticed
			return
		}
		s.reply(req, nil, err)
	}
}

type writeCloseParams struct {
	Handle string `json:"handle"`
	Abort  bool   `json:"abort"` // drop the handle; the guest file keeps what was written
}

func handleWriteClose(s *session, req *request) {
	var p writeCloseParams
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	h := s.lockHandle(req, p.Handle)
	if h == nil {
		return
	}
	if p.Abort {
		delete(s.handles, h.id)
		s.mu.Unlock()
		s.abortHandle(h, errAborted)
		s.reply(req, map[string]bool{"aborted": true}, nil)
		return
	}
	// Unlisted at once: later chunks for it are refused, not reordered.
	delete(s.handles, h.id)
	err := h.sink.enqueue(req, sinkItem{fin: true})
	s.mu.Unlock()
	if err != nil {
		s.abortHandle(h, err)
		s.reply(req, nil, err)
	}
}

func (s *session) abortHandle(h *writeHandle, why *Error) {
	s.dropHandle(h.id)
	h.cancel(why)
}

// --- read_file ---------------------------------------------------------------

type pathParams struct {
	ID   string `json:"id"`
	Path string `json:"path"`
}

// lookupPath decodes pathParams, checks the path and ties c to the sandbox
// as s.lookup does (call untie when done).
func (s *session) lookupPath(c *call, raw json.RawMessage) (e *entry, path string, untie func(), err error) {
	var p pathParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, "", nil, err
	}
	if err := validPath(p.Path); err != nil {
		return nil, "", nil, err
	}
	e, untie, err = s.lookup(c, p.ID)
	return e, p.Path, untie, err
}

type chunkParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Data      []byte          `json:"data"` // base64
}

// chunkWriter turns the file's bytes into read_file_chunk notifications.
type chunkWriter struct {
	s    *session
	ctx  context.Context
	id   json.RawMessage
	hash hash.Hash
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	n := 0
	for len(p) > 0 {
		piece := p[:min(len(p), readChunk)]
		if err := w.s.out.notify("read_file_chunk", chunkParams{RequestID: w.id, Data: piece}); err != nil {
			return n, err
		}
		w.hash.Write(piece)
		n += len(piece)
		p = p[len(piece):]
	}
	return n, nil
}

func handleReadFile(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	e, path, untie, err := s.lookupPath(c, raw)
	if err != nil {
		return nil, err
	}
	defer untie()
	cw := &chunkWriter{s: s, ctx: ctx, id: c.id, hash: sha256.New()}
	bw := bufio.NewWriterSize(cw, readChunk)
	n, err := e.sb.ReadFile(ctx, path, bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return nil, err
	}
	return map[string]any{"size": n, "sha256": hex.EncodeToString(cw.hash.Sum(nil))}, nil
}

// --- list_files ----------------------------------------------------------------

func handleListFiles(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	e, path, untie, err := s.lookupPath(c, raw)
	if err != nil {
		return nil, err
	}
	defer untie()
	files, err := e.sb.ListFiles(ctx, path)
	if err != nil {
		return nil, err
	}
	if files == nil {
		files = []sandbox.FileInfo{}
	}
	return map[string]any{"files": files}, nil
}

func validPath(p string) *Error {
	switch {
	case p == "":
		return errorf(CodeInvalidParams, `invalid params: "path" is required`)
	case !strings.HasPrefix(p, "/"):
		return errorf(CodeInvalidParams, `invalid params: "path" %q: want an absolute guest path`, p)
	case strings.IndexByte(p, 0) >= 0:
		return errorf(CodeInvalidParams, `invalid params: "path" contains a NUL byte`)
	}
	return nil
}
