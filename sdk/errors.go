package sdk

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Error codes of the JSON-RPC protocol (docs/rpc.md). They mirror the
// server's; the SDK does not import the server.
const (
	CodeParseError     = -32700
	CodeInvalidRequest = -32600
	CodeMethodNotFound = -32601
	CodeInvalidParams  = -32602
	CodeInternal       = -32603

	CodeSandboxError   = -32000
	CodeCancelled      = -32001
	CodeUnknownSandbox = -32002
	CodeTooLarge       = -32003
	CodeLimit          = -32004
	CodeNotSupported   = -32005
	CodeNotFound       = -32006
	CodePermission     = -32007
	CodeGuestError     = -32008
	CodeUnknownRequest = -32009
	CodeSandboxClosed  = -32010
	CodeSessionEnded   = -32011
)

// RPCError is an error answered by the server. Match classes of errors
// with errors.Is and the sentinels below; read Code for the exact one.
type RPCError struct {
	Code    int             `json:"code"`
	Message string          `json:"message"`
	Data    json.RawMessage `json:"data,omitempty"`
}

func (e *RPCError) Error() string { return fmt.Sprintf("matchlock: %s (code %d)", e.Message, e.Code) }

// Is matches the sentinels.
func (e *RPCError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Code == CodeNotFound
	case ErrPermission:
		return e.Code == CodePermission
	case ErrCancelled:
		return e.Code == CodeCancelled
	case ErrNotSupported:
		return e.Code == CodeNotSupported
	case ErrUnknownSandbox:
		return e.Code == CodeUnknownSandbox
	case ErrLimit:
		return e.Code == CodeLimit
	case ErrSandboxClosed:
		return e.Code == CodeSandboxClosed || e.Code == CodeSessionEnded
	case ErrInvalid:
		return e.Code == CodeInvalidParams || e.Code == CodeInvalidRequest
	}
	return false
}

// Sentinels. Errors from the server match them through RPCError.Is; the
// client's own failures wrap ErrClosed, ErrNoSandbox or ErrProtocol.
var (
	ErrNotFound       = errors.New("matchlock: not found in the sandbox")
	ErrPermission     = errors.New("matchlock: permission denied in the sandbox")
	ErrCancelled      = errors.New("matchlock: request cancelled")
	ErrNotSupported   = errors.New("matchlock: not supported yet")
	ErrUnknownSandbox = errors.New("matchlock: no such sandbox")
	ErrLimit          = errors.New("matchlock: session limit reached")
	ErrSandboxClosed  = errors.New("matchlock: sandbox closed")
	ErrInvalid        = errors.New("matchlock: invalid request")

	ErrClosed    = errors.New("matchlock: client closed")
	ErrNoSandbox = errors.New("matchlock: no sandbox: call Launch first")
	ErrProtocol  = errors.New("matchlock: protocol error")
)
