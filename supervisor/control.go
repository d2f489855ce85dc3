package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/sandbox"
)

// More supervisor-only kinds: live policy changes and port forwards.
const (
	KindAllowList   = "supervisor.allow_list"
	KindPortForward = "supervisor.port_forward"
)

// ControlRequest is the header of a supervisor control stream.
type ControlRequest struct {
	Kind     string   `json:"kind"`
	Op       string   `json:"op,omitempty"` // allow_list: add, rm, ls
	Patterns []string `json:"patterns,omitempty"`
	Private  bool     `json:"private,omitempty"` // allow_list: the --allow-private list
	Port     string   `json:"port,omitempty"`    // port_forward: [HOST_IP:]HOST_PORT:GUEST_PORT
}

// ControlReply answers a ControlRequest.
type ControlReply struct {
	Error   string   `json:"error,omitempty"`
	Allow   []string `json:"allow,omitempty"`
	Private []string `json:"private,omitempty"`
	Addr    string   `json:"addr,omitempty"`
}

func (s *Server) control(st *proto.Stream) {
	defer st.Close()
	var req ControlRequest
	reply := ControlReply{}
	if err := json.Unmarshal(st.Header(), &req); err != nil {
		reply.Error = "bad request: " + err.Error()
	} else if err := s.apply(&req, &reply); err != nil {
		reply.Error = err.Error()
	}
	b, _ := json.Marshal(reply)
	st.SendMsg(b)
}

func (s *Server) apply(req *ControlRequest, reply *ControlReply) error {
	switch req.Kind {
	case KindAllowList:
		var err error
		switch req.Op {
		case "add":
			if req.Private {
				err = errors.New("allow-private cannot change on a running sandbox")
			} else {
				err = s.SB.AllowHosts(req.Patterns...)
			}
		case "rm":
			err = s.SB.DenyHosts(req.Patterns...)
		case "ls":
		default:
			err = fmt.Errorf("allow-list: unknown op %q", req.Op)
		}
		if err != nil {
			return err
		}
		reply.Allow, reply.Private, err = s.SB.AllowList()
		return err
	case KindPortForward:
		spec, err := sandbox.ParsePortSpec(req.Port)
		if err != nil {
			return err
		}
		f, err := s.SB.Publish(spec)
		if err != nil {
			return err
		}
		reply.Addr = f.Addr
		return nil
	}
	return fmt.Errorf("unknown kind %q", req.Kind)
}

// Control sends one control request to the supervisor of sandbox id.
func Control(ctx context.Context, id string, req ControlRequest) (*ControlReply, error) {
	var reply ControlReply
	if err := request(ctx, id, req, &reply); err != nil {
		return nil, err
	}
	if reply.Error != "" {
		return &reply, errors.New(reply.Error)
	}
	return &reply, nil
}

// request opens one stream to the supervisor of sandbox id with req as its
// header and decodes the single message it answers into reply.
func request(ctx context.Context, id string, req, reply any) error {
	sb, err := Dial(ctx, id)
	if err != nil {
		return err
	}
	defer sb.Conn().Close()
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	st, err := sb.Conn().Open(ctx, b)
	if err != nil {
		return err
	}
	defer st.Close()
	msg, err := st.RecvMsg(ctx)
	if err != nil {
		return fmt.Errorf("supervisor: %w", err)
	}
	return json.Unmarshal(msg, reply)
}
