// tikv-testserver serves the PD and TiKV gRPC protocols on loopback in front
// of the TiKV project's own reference model of TiKV's transactional storage
// (github.com/tikv/client-go/v2/testutils: an MVCC store with a mock cluster
// and PD), so that ContextOS's unmodified tikv-client talks to it exactly as it
// talks to a real cluster. It is a test server: data lives in memory and is
// gone when the process exits.
//
// Usage:
//
//	tikv-testserver [-listen 127.0.0.1] [-pd-port N] [-kv-port N] [-advertise HOST] [-split KEY]... [-v]
//
// -split KEY (repeatable, keys in increasing order) splits the key space into
// regions at raw KEY, written with Go string escapes (\x00 for a NUL byte);
// without it one region covers all keys.
//
// Protocol: once both gRPC servers accept connections, exactly one line
// "READY <host:port of PD>" goes to stdout. Logs go to stderr. A start-up
// failure prints one line "tikv-testserver: <reason>" to stderr and exits 1.
// SIGTERM or SIGINT, or the death of the parent process, stops the servers
// and exits 0 within about a second.
//
// Every call that is not implemented fails with gRPC status Unimplemented and
// a message naming the method, and prints one line naming it on stderr.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pingcap/kvproto/pkg/pdpb"
	"github.com/pingcap/kvproto/pkg/tikvpb"
	"github.com/tikv/client-go/v2/testutils"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// gracefulStopTimeout bounds the orderly shutdown; the TSO streams stay open
// until the client goes, so whatever is still running then is cut.
const gracefulStopTimeout = time.Second

// maxMessageSize lifts grpc-go's 4 MiB default on what the server receives
// and sends, so that message size limits are the client's (tikv-client
// accepts 4 MiB responses by default) and the model's (it refuses requests of
// 8 MiB or more as RaftEntryTooLarge, as TiKV bounds its Raft entries).
const maxMessageSize = 1 << 30

var logger = log.New(os.Stderr, "tikv-testserver: ", log.Ltime|log.Lmicroseconds)

type splitKeys [][]byte

func (s *splitKeys) String() string { return fmt.Sprint(len(*s), " keys") }

// Set takes a raw key written with Go string escapes (\xNN, \\), so that keys
// with bytes a command line cannot carry (NUL) can be given.
func (s *splitKeys) Set(v string) error {
	key, err := strconv.Unquote(`"` + strings.ReplaceAll(v, `"`, `\"`) + `"`)
	if err != nil {
		return fmt.Errorf("split key %q: %v (use Go string escapes such as \\x00)", v, err)
	}
	if key == "" {
		return errors.New("a split key cannot be empty")
	}
	*s = append(*s, []byte(key))
	return nil
}

func main() {
	var l listenConfig
	flag.StringVar(&l.host, "listen", "127.0.0.1", "host to listen on (loopback unless the server runs in a pod of its own)")
	flag.IntVar(&l.pdPort, "pd-port", 0, "PD's port (default: a free one chosen by the kernel)")
	flag.IntVar(&l.kvPort, "kv-port", 0, "TiKV's port (default: a free one chosen by the kernel)")
	flag.StringVar(&l.advertise, "advertise", "", "host that clients are told to reach PD and TiKV at (default: the listen host); in a pod, its own address")
	var splits splitKeys
	flag.Var(&splits, "split", "split the key space into regions at this raw key, written with Go string escapes such as \\x00 (repeatable, in increasing order; default: one region for all keys)")
	verbose := flag.Bool("v", false, "log every gRPC call to stderr")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: tikv-testserver [-listen HOST] [-pd-port N] [-kv-port N] [-advertise HOST] [-split KEY]... [-v]")
		os.Exit(2)
	}
	os.Exit(serve(l, splits, *verbose))
}

// listenConfig says where the two services listen and under which host they
// are named to clients (PD's member list and its store address): a server in a
// pod listens on every address and names its own.
type listenConfig struct {
	host           string
	pdPort, kvPort int
	advertise      string
}

// named is the address clients are told for a listener of this config.
func (l listenConfig) named(lis net.Listener) string {
	addr := lis.Addr().String()
	if l.advertise == "" {
		return addr
	}
	_, port, _ := net.SplitHostPort(addr)
	return net.JoinHostPort(l.advertise, port)
}

func fail(err error) int {
	fmt.Fprintf(os.Stderr, "tikv-testserver: %v\n", err)
	return 1
}

func serve(l listenConfig, splits [][]byte, verbose bool) int {
	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stopSignals()
	stopCtx, stopNow := context.WithCancel(sigCtx)
	defer stopNow()
	go watchParent(stopCtx, stopNow)

	srv, err := start(l, splits, verbose)
	if err != nil {
		return fail(err)
	}
	logger.Printf("PD at %s, TiKV store %d at %s, %d region(s) %v", srv.pdAddr, srv.storeID, srv.kvAddr, len(srv.regionIDs), srv.regionIDs)
	for _, key := range splits {
		logger.Printf("region boundary at raw key %x", key)
	}
	if _, err := fmt.Fprintf(os.Stdout, "READY %s\n", srv.pdAddr); err != nil {
		srv.stop()
		return fail(err)
	}
	_ = os.Stdout.Sync()

	exit := 0
	select {
	case <-stopCtx.Done():
	case err := <-srv.served:
		exit = fail(fmt.Errorf("gRPC server stopped: %v", err))
	}
	stopSignals()
	srv.stop()
	logger.Printf("stopped; calls served: %s", srv.calls.summary())
	return exit
}

// server is a running pair of gRPC servers (PD, TiKV) over one mock TiKV.
type server struct {
	pdAddr, kvAddr string
	storeID        uint64
	regionIDs      []uint64
	pdSrv, kvSrv   *grpc.Server
	served         chan error
	mock           *testutils.MockClient
	calls          *callCounter
}

// start bootstraps the mock cluster (one store, len(splits)+1 regions) and
// serves PD and TiKV on the ports l names (free ones by default).
func start(l listenConfig, splits [][]byte, verbose bool) (*server, error) {
	for i := 1; i < len(splits); i++ {
		if bytes.Compare(splits[i-1], splits[i]) >= 0 {
			return nil, fmt.Errorf("split keys must be given in increasing order: %q then %q", splits[i-1], splits[i])
		}
	}
	pdLis, err := net.Listen("tcp", net.JoinHostPort(l.host, strconv.Itoa(l.pdPort)))
	if err != nil {
		return nil, fmt.Errorf("PD listener: %w", err)
	}
	kvLis, err := net.Listen("tcp", net.JoinHostPort(l.host, strconv.Itoa(l.kvPort)))
	if err != nil {
		pdLis.Close()
		return nil, fmt.Errorf("TiKV listener: %w", err)
	}
	s := &server{pdAddr: l.named(pdLis), kvAddr: l.named(kvLis), served: make(chan error, 2), calls: newCallCounter(verbose)}

	// The TiKV project's reference model: MVCC store (in-memory goleveldb),
	// cluster metadata and PD client. Path "" keeps everything in memory.
	mock, cluster, pdClient, err := testutils.NewMockTiKV("", nil)
	if err != nil {
		pdLis.Close()
		kvLis.Close()
		return nil, fmt.Errorf("mock TiKV: %w", err)
	}
	s.mock = mock
	s.storeID, s.regionIDs, _ = testutils.BootstrapWithMultiRegions(cluster, splits...)
	// Region lookups answer with this store, so the client comes back to the
	// TiKV service below; the mock routes requests by this address too.
	cluster.UpdateStoreAddr(s.storeID, s.kvAddr)

	newServer := func() *grpc.Server {
		return grpc.NewServer(
			grpc.MaxRecvMsgSize(maxMessageSize),
			grpc.MaxSendMsgSize(maxMessageSize),
			grpc.ChainUnaryInterceptor(s.calls.unary),
			grpc.ChainStreamInterceptor(s.calls.stream),
			grpc.UnknownServiceHandler(s.calls.unknown),
		)
	}
	s.pdSrv, s.kvSrv = newServer(), newServer()
	pdpb.RegisterPDServer(s.pdSrv, newPDServer(s.pdAddr, pdClient))
	tikvpb.RegisterTikvServer(s.kvSrv, newTikvServer(s.kvAddr, mock))
	go func() { s.served <- s.pdSrv.Serve(pdLis) }()
	go func() { s.served <- s.kvSrv.Serve(kvLis) }()
	return s, nil
}

// stop ends both servers, gracefully for up to gracefulStopTimeout (the TSO
// streams stay open as long as their clients), and closes the mock store.
func (s *server) stop() {
	var wg sync.WaitGroup
	for _, g := range []*grpc.Server{s.pdSrv, s.kvSrv} {
		wg.Add(1)
		go func(g *grpc.Server) {
			defer wg.Done()
			done := make(chan struct{})
			go func() { g.GracefulStop(); close(done) }()
			select {
			case <-done:
			case <-time.After(gracefulStopTimeout):
				g.Stop()
			}
		}(g)
	}
	wg.Wait()
	if err := s.mock.Close(); err != nil {
		logger.Printf("closing the mock store: %v", err)
	}
}

// watchParent calls stop when the process that started the server has gone
// (this process was re-parented), so that a test killed with SIGKILL leaves
// no server behind. TIKV_TESTSERVER_KEEP_ORPHAN=1 disables it.
func watchParent(ctx context.Context, stop func()) {
	if os.Getenv("TIKV_TESTSERVER_KEEP_ORPHAN") == "1" {
		return
	}
	parent := os.Getppid()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
		if os.Getppid() != parent {
			logger.Printf("parent process %d gone, shutting down", parent)
			stop()
			return
		}
	}
}

// callCounter counts calls per method, logs them with -v, and makes every
// unimplemented call loud: a line on stderr naming the method, and a status
// message naming it for the client.
type callCounter struct {
	verbose bool
	mu      sync.Mutex
	counts  map[string]int
}

func newCallCounter(verbose bool) *callCounter {
	return &callCounter{verbose: verbose, counts: map[string]int{}}
}

// count counts one call of method (at its start, so that streams still open
// at shutdown are counted too).
func (c *callCounter) count(method string) {
	short := method[strings.LastIndex(method, "/")+1:]
	c.mu.Lock()
	c.counts[short]++
	c.mu.Unlock()
}

// check logs the outcome of a call and makes an Unimplemented answer name the
// method.
func (c *callCounter) check(method string, err error) error {
	if status.Code(err) == codes.Unimplemented {
		logger.Printf("UNIMPLEMENTED %s: %s", method, status.Convert(err).Message())
		return status.Errorf(codes.Unimplemented, "tikv-testserver does not implement %s: %s", method, status.Convert(err).Message())
	}
	if c.verbose {
		logger.Printf("%s -> %v", method, status.Code(err))
	}
	return err
}

func (c *callCounter) unary(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	c.count(info.FullMethod)
	resp, err := handler(ctx, req)
	return resp, c.check(info.FullMethod, err)
}

func (c *callCounter) stream(srv interface{}, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	c.count(info.FullMethod)
	return c.check(info.FullMethod, handler(srv, ss))
}

// unknown answers methods and services this server does not register at all
// (for example methods newer than the kvproto version it is built with). gRPC
// runs it through the stream interceptor, which counts and logs it.
func (c *callCounter) unknown(interface{}, grpc.ServerStream) error {
	return status.Error(codes.Unimplemented, "unknown service or method")
}

func (c *callCounter) summary() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.counts) == 0 {
		return "none"
	}
	names := make([]string, 0, len(c.counts))
	for name := range c.counts {
		names = append(names, name)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, name := range names {
		parts[i] = fmt.Sprintf("%s=%d", name, c.counts[name])
	}
	return strings.Join(parts, " ")
}
