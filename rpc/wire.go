package rpc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Error codes. The first five are JSON-RPC 2.0's; the rest are matchlock's
// own, in the range the specification leaves to servers. They are part of
// the protocol: never renumber them (docs/rpc.md lists them).
const (
	CodeParseError     = -32700 // the line is not JSON
	CodeInvalidRequest = -32600 // JSON, but not a JSON-RPC 2.0 request
	CodeMethodNotFound = -32601
	CodeInvalidParams  = -32602
	CodeInternal       = -32603

	CodeSandboxError   = -32000 // the sandbox library failed (boot, image, guest I/O)
	CodeCancelled      = -32001 // cancelled by a `cancel` request
	CodeUnknownSandbox = -32002 // no sandbox with that id in this session
	CodeTooLarge       = -32003 // a line longer than the session's maximum
	CodeLimit          = -32004 // a per-session limit is reached; retry later
	CodeNotSupported   = -32005 // valid, but this build cannot do it (yet)
	CodeNotFound       = -32006 // a guest path or command does not exist
	CodePermission     = -32007 // the guest refused: permission denied
	CodeGuestError     = -32008 // the guest refused the request for another reason
	CodeUnknownRequest = -32009 // request_id or handle names nothing in flight
	CodeSandboxClosed  = -32010 // the sandbox was closed, or its VM exited
	CodeSessionEnded   = -32011 // the session is shutting down (stdin EOF, signal)
)

// Error is a JSON-RPC error object. Handlers return it (or any error,
// converted by toError) and the session writes it to the client.
type Error struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

func (e *Error) Error() string { return fmt.Sprintf("%s (code %d)", e.Message, e.Code) }

func errorf(code int, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Causes for cancelled request contexts; toError reports the cause rather
// than a bare "context canceled".
var (
	errCancelled     = &Error{Code: CodeCancelled, Message: "request cancelled"}
	errSessionEnded  = &Error{Code: CodeSessionEnded, Message: "session ended: every sandbox of the session is being closed"}
	errSandboxClosed = &Error{Code: CodeSandboxClosed, Message: "the sandbox was closed"}
	errSandboxExited = &Error{Code: CodeSandboxClosed, Message: "the sandbox's VM exited"}
)

// request is one decoded input line. ID is nil for a notification (no "id"
// member), the bytes "null" for an explicit null id.
type request struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params"`
}

func (r *request) isNotification() bool { return r.ID == nil }

var nullID = json.RawMessage("null")

// parseRequest decodes one line. On failure it returns the error to send
// and the id to send it with (null when the id could not be read).
func parseRequest(line []byte) (*request, json.RawMessage, *Error) {
	parseErr := errorf(CodeParseError, "parse error: the line is not valid JSON")
	trimmed := bytes.TrimLeft(line, " \t\r")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		if !json.Valid(line) {
			return nil, nullID, parseErr
		}
		if trimmed[0] == '[' {
			return nil, nullID, errorf(CodeInvalidRequest, "invalid request: batches are not supported; send one request per line")
		}
		return nil, nullID, errorf(CodeInvalidRequest, "invalid request: want a JSON object")
	}
	// One pass: Unmarshal validates the whole line before decoding it, so
	// a syntax error here means "not JSON".
	var r request
	if err := json.Unmarshal(line, &r); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, nullID, parseErr
		}
		return nil, idOf(line), errorf(CodeInvalidRequest, "invalid request: %v", err)
	}
	if r.ID != nil && !validID(r.ID) {
		return nil, nullID, errorf(CodeInvalidRequest, "invalid request: id must be a string, a number or null")
	}
	id := r.ID
	if id == nil {
		id = nullID
	}
	if r.JSONRPC != "2.0" {
		return nil, id, errorf(CodeInvalidRequest, `invalid request: "jsonrpc" must be "2.0"`)
	}
	if r.Method == "" {
		return nil, id, errorf(CodeInvalidRequest, `invalid request: "method" is missing`)
	}
	if r.ID != nil {
		var buf bytes.Buffer
		json.Compact(&buf, r.ID)
		r.ID = buf.Bytes()
	}
	return &r, nil, nil
}

// idOf extracts a usable id from an object whose other members are wrong.
func idOf(line []byte) json.RawMessage {
	var probe struct {
		ID json.RawMessage `json:"id"`
	}
	if json.Unmarshal(line, &probe) == nil && probe.ID != nil && validID(probe.ID) {
		return probe.ID
	}
	return nullID
}

func validID(id json.RawMessage) bool {
	b := bytes.TrimSpace(id)
	if len(b) == 0 {
		return false
	}
	switch c := b[0]; {
	case c == '"', c == '-', c >= '0' && c <= '9':
		return true
	case bytes.Equal(b, nullID):
		return true
	}
	return false
}

// decodeParams strictly decodes params into v: unknown members are an
// error (a misspelt option must not be silently ignored), and absent or
// null params decode as {}.
func decodeParams(raw json.RawMessage, v any) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, nullID) {
		raw = []byte("{}")
	}
	if raw[0] != '{' {
		return errorf(CodeInvalidParams, "invalid params: want a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return errorf(CodeInvalidParams, "invalid params: %q: want %v, got JSON %s", te.Field, te.Type, te.Value)
		}
		return errorf(CodeInvalidParams, "invalid params: %v", err)
	}
	return nil
}

type response struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  any             `json:"result"`
}

type errorResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Error   *Error          `json:"error"`
}

type notification struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  any    `json:"params"`
}

// lineReader reads newline-terminated lines of at most max bytes. A longer
// line is consumed and discarded whole, so the stream stays in sync.
type lineReader struct {
	r   *bufio.Reader
	max int
}

func newLineReader(r io.Reader, max int) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, max+1), max: max}
}

// next returns the next line without its line ending. The slice is valid
// until the following call. tooLong reports a discarded oversized line.
func (l *lineReader) next() (line []byte, tooLong bool, err error) {
	line, err = l.r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		for err == bufio.ErrBufferFull {
			_, err = l.r.ReadSlice('\n')
		}
		if err != nil && err != io.EOF {
			return nil, true, err
		}
		return nil, true, nil
	}
	if err == io.EOF && len(line) > 0 {
		err = nil // a last line without a newline still counts
	}
	if err != nil {
		return nil, false, err
	}
	line = bytes.TrimRight(line, "\r\n")
	if len(line) > l.max {
		return nil, true, nil
	}
	return line, false, nil
}

// lineWriter serialises whole JSON lines onto the output. After the first
// write error every later write fails at once with that error.
type lineWriter struct {
	mu  sync.Mutex // held for a whole line: lines never interleave
	w   io.Writer
	err error // guarded by mu
	// onError runs once, outside mu, after the first write error.
	onError func(error)
}

func (lw *lineWriter) send(v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil { // Encode appends the newline
		return fmt.Errorf("rpc: encode %T: %w", v, err)
	}
	lw.mu.Lock()
	if lw.err != nil {
		err := lw.err
		lw.mu.Unlock()
		return err
	}
	_, err := lw.w.Write(buf.Bytes())
	if err == nil {
		if f, ok := lw.w.(interface{ Flush() error }); ok {
			err = f.Flush()
		}
	}
	first := err != nil
	if first {
		lw.err = err
	}
	lw.mu.Unlock()
	if first && lw.onError != nil {
		lw.onError(err)
	}
	return err
}

func (lw *lineWriter) result(id json.RawMessage, v any) error {
	if v == nil {
		v = struct{}{}
	}
	return lw.send(response{JSONRPC: "2.0", ID: id, Result: v})
}

func (lw *lineWriter) error(id json.RawMessage, e *Error) error {
	if id == nil {
		id = nullID
	}
	return lw.send(errorResponse{JSONRPC: "2.0", ID: id, Error: e})
}

func (lw *lineWriter) notify(method string, params any) error {
	return lw.send(notification{JSONRPC: "2.0", Method: method, Params: params})
}
