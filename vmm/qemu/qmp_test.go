package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeQMP plays QEMU's side of a QMP socket: greeting, capabilities, an
// event before every answer, an error for "fail", and a received
// descriptor check for "getfd".
func fakeQMP(t *testing.T, c *net.UnixConn, gotFD chan<- int) {
	defer c.Close()
	c.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\r\n"))
	for {
		buf := make([]byte, 4096)
		oob := make([]byte, 64)
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var cmd struct {
			Execute string `json:"execute"`
			ID      string `json:"id"`
		}
		if json.Unmarshal(buf[:n], &cmd) != nil {
			return
		}
		c.Write([]byte(`{"event": "STOP", "data": {}}` + "\n"))
		switch cmd.Execute {
		case "fail":
			c.Write([]byte(`{"error": {"class": "GenericError", "desc": "no"}, "id": "` + cmd.ID + `"}` + "\n"))
		case "getfd":
			fd := -1
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(msgs) == 1 {
				if fds, err := unix.ParseUnixRights(&msgs[0]); err == nil && len(fds) == 1 {
					fd = fds[0]
				}
			}
			gotFD <- fd
			c.Write([]byte(`{"return": {}, "id": "` + cmd.ID + `"}` + "\n"))
		case "query-status":
			c.Write([]byte(`{"return": {"running": true, "status": "running"}, "id": "` + cmd.ID + `"}` + "\n"))
		default:
			c.Write([]byte(`{"return": {}, "id": "` + cmd.ID + `"}` + "\n"))
		}
	}
}

func TestQMPClient(t *testing.T) {
	host, guest, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	hc, _ := net.FileConn(host)
	gc, _ := net.FileConn(guest)
	host.Close()
	guest.Close()
	gotFD := make(chan int, 1)
	go fakeQMP(t, gc.(*net.UnixConn), gotFD)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := newQMP(ctx, hc)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Running bool `json:"running"`
	}
	if err := q.do(ctx, "query-status", nil, &st, -1); err != nil || !st.Running {
		t.Fatalf("query-status: %+v %v", st, err)
	}
	var qe *QMPError
	if err := q.do(ctx, "fail", nil, nil, -1); !errors.As(err, &qe) || qe.Desc != "no" {
		t.Fatalf("error answer: %v", err)
	}
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := q.do(ctx, "getfd", map[string]any{"fdname": "x"}, nil, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if fd := <-gotFD; fd < 0 {
		t.Fatal("getfd carried no descriptor")
	} else {
		unix.Close(fd)
	}
	hc.Close()
	if err := q.do(ctx, "query-status", nil, nil, -1); err == nil {
		t.Fatal("command on a closed monitor succeeded")
	}
}
