package main

import (
	"bytes"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pingcap/kvproto/pkg/keyspacepb"
	"github.com/pingcap/kvproto/pkg/kvrpcpb"
	"github.com/pingcap/kvproto/pkg/pdpb"
	"github.com/pingcap/kvproto/pkg/tikvpb"
	"github.com/tikv/client-go/v2/util/codec"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// syncBuffer collects the server's log lines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type fixture struct {
	srv  *server
	pd   pdpb.PDClient
	kv   tikvpb.TikvClient
	conn *grpc.ClientConn
	logs *syncBuffer
	ctx  context.Context
}

// startFixture runs a server with one split at "m" (two regions) and gRPC
// clients for both services, as tikv-client would connect.
func startFixture(t *testing.T) *fixture {
	t.Helper()
	logs := &syncBuffer{}
	logger.SetOutput(logs)
	srv, err := start(listenConfig{host: "127.0.0.1"}, [][]byte{[]byte("m")}, false)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(addr string) *grpc.ClientConn {
		conn, err := grpc.Dial(addr, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithTimeout(10*time.Second))
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		return conn
	}
	pdConn, kvConn := dial(srv.pdAddr), dial(srv.kvAddr)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(func() {
		cancel()
		pdConn.Close()
		kvConn.Close()
		srv.stop()
	})
	return &fixture{srv: srv, pd: pdpb.NewPDClient(pdConn), kv: tikvpb.NewTikvClient(kvConn), conn: kvConn, logs: logs, ctx: ctx}
}

// tso takes one timestamp from the PD stream, as a TSO version.
func (f *fixture) tso(t *testing.T, count uint32) uint64 {
	t.Helper()
	stream, err := f.pd.Tso(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.CloseSend()
	if err := stream.Send(&pdpb.TsoRequest{Count: count}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != count {
		t.Fatalf("Tso count %d, want %d", resp.Count, count)
	}
	return uint64(resp.Timestamp.Physical)<<logicalBits | uint64(resp.Timestamp.Logical)
}

// regionCtx addresses a request for raw key to its region's leader, as
// tikv-client does after asking PD with the memcomparable-encoded key.
func (f *fixture) regionCtx(t *testing.T, key string) *kvrpcpb.Context {
	t.Helper()
	resp, err := f.pd.GetRegion(f.ctx, &pdpb.GetRegionRequest{RegionKey: codec.EncodeBytes(nil, []byte(key))})
	if err != nil || resp.Region == nil {
		t.Fatalf("GetRegion %q: %v %v", key, err, resp)
	}
	return &kvrpcpb.Context{RegionId: resp.Region.Id, RegionEpoch: resp.Region.RegionEpoch, Peer: resp.Leader}
}

func TestPDAnswersFromTheMockCluster(t *testing.T) {
	f := startFixture(t)
	members, err := f.pd.GetMembers(f.ctx, &pdpb.GetMembersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := members.Leader.GetClientUrls(); len(got) != 1 || got[0] != "http://"+f.srv.pdAddr {
		t.Fatalf("leader client URLs %v", got)
	}
	a := f.regionCtx(t, "a")
	z := f.regionCtx(t, "z")
	if a.RegionId == z.RegionId {
		t.Fatalf("keys on both sides of the split share region %d", a.RegionId)
	}
	store, err := f.pd.GetStore(f.ctx, &pdpb.GetStoreRequest{StoreId: a.Peer.StoreId})
	if err != nil || store.Store.GetAddress() != f.srv.kvAddr {
		t.Fatalf("store address %v (%v), want the TiKV service %s", store.GetStore().GetAddress(), err, f.srv.kvAddr)
	}
	byID, err := f.pd.GetRegionByID(f.ctx, &pdpb.GetRegionByIDRequest{RegionId: z.RegionId})
	if err != nil || !bytes.Equal(byID.Region.StartKey, codec.EncodeBytes(nil, []byte("m"))) {
		t.Fatalf("region %d starts at %q (%v), want the encoded split key", z.RegionId, byID.GetRegion().GetStartKey(), err)
	}
	scan, err := f.pd.ScanRegions(f.ctx, &pdpb.ScanRegionsRequest{Limit: 10})
	if err != nil || len(scan.Regions) != 2 {
		t.Fatalf("ScanRegions: %d regions (%v), want 2", len(scan.GetRegions()), err)
	}
	prev := uint64(0)
	for i := 0; i < 1000; i++ {
		count := uint32(1 + i%7)
		last := f.tso(t, count)
		if first := last - uint64(count) + 1; first <= prev {
			t.Fatalf("timestamps went back: %d after %d", first, prev)
		}
		prev = last
	}
}

func TestTransactionsGoThroughTheMockStore(t *testing.T) {
	f := startFixture(t)
	key := []byte("a/key")
	rctx := f.regionCtx(t, string(key))

	missing, err := f.kv.KvGet(f.ctx, &kvrpcpb.GetRequest{Context: rctx, Key: key, Version: f.tso(t, 1)})
	if err != nil || !missing.NotFound {
		t.Fatalf("a missing key answers not_found: %v %v", missing, err)
	}

	// Prewrite, then a reader meets the live lock, and CheckTxnStatus
	// describes it (lock_info, which tikv-client requires).
	start := f.tso(t, 1)
	pre, err := f.kv.KvPrewrite(f.ctx, &kvrpcpb.PrewriteRequest{
		Context: rctx, Mutations: []*kvrpcpb.Mutation{{Op: kvrpcpb.Op_Put, Key: key, Value: []byte("v1")}},
		PrimaryLock: key, StartVersion: start, LockTtl: 60_000,
	})
	if err != nil || len(pre.Errors) != 0 || pre.RegionError != nil {
		t.Fatalf("prewrite: %v %v", pre, err)
	}
	locked, err := f.kv.KvGet(f.ctx, &kvrpcpb.GetRequest{Context: rctx, Key: key, Version: f.tso(t, 1)})
	if err != nil || locked.Error.GetLocked().GetLockVersion() != start {
		t.Fatalf("a read after the lock sees it: %v %v", locked, err)
	}
	status1, err := f.kv.KvCheckTxnStatus(f.ctx, &kvrpcpb.CheckTxnStatusRequest{
		Context: rctx, PrimaryKey: key, LockTs: start, CallerStartTs: f.tso(t, 1), CurrentTs: f.tso(t, 1),
	})
	if err != nil || status1.LockTtl == 0 || status1.LockInfo.GetLockVersion() != start || !bytes.Equal(status1.LockInfo.GetPrimaryLock(), key) {
		t.Fatalf("live transaction status: %v %v", status1, err)
	}

	// A second writer that started earlier conflicts at prewrite once the
	// first one commits.
	early := f.tso(t, 1)
	commitTS := f.tso(t, 1)
	commit, err := f.kv.KvCommit(f.ctx, &kvrpcpb.CommitRequest{Context: rctx, StartVersion: start, Keys: [][]byte{key}, CommitVersion: commitTS})
	if err != nil || commit.Error != nil {
		t.Fatalf("commit: %v %v", commit, err)
	}
	got, err := f.kv.KvGet(f.ctx, &kvrpcpb.GetRequest{Context: rctx, Key: key, Version: f.tso(t, 1)})
	if err != nil || string(got.Value) != "v1" || got.NotFound {
		t.Fatalf("read after commit: %v %v", got, err)
	}
	conflict, err := f.kv.KvPrewrite(f.ctx, &kvrpcpb.PrewriteRequest{
		Context: rctx, Mutations: []*kvrpcpb.Mutation{{Op: kvrpcpb.Op_Put, Key: key, Value: []byte("v2")}},
		PrimaryLock: key, StartVersion: early, LockTtl: 3000,
	})
	if err != nil || len(conflict.Errors) != 1 || conflict.Errors[0].Conflict == nil {
		t.Fatalf("a stale writer gets a write conflict: %v %v", conflict, err)
	}
	done, err := f.kv.KvCheckTxnStatus(f.ctx, &kvrpcpb.CheckTxnStatusRequest{
		Context: rctx, PrimaryKey: key, LockTs: start, CallerStartTs: f.tso(t, 1), CurrentTs: f.tso(t, 1),
	})
	if err != nil || done.CommitVersion != commitTS || done.LockInfo != nil {
		t.Fatalf("committed transaction status: %v %v", done, err)
	}

	// A key sent to the wrong region is refused the way the model refuses
	// it, and the server keeps serving.
	wrong := f.regionCtx(t, "z")
	if _, err := f.kv.KvGet(f.ctx, &kvrpcpb.GetRequest{Context: wrong, Key: key, Version: f.tso(t, 1)}); status.Code(err) != codes.Internal {
		t.Fatalf("key outside its region: %v", err)
	}
	if _, err := f.kv.KvGet(f.ctx, &kvrpcpb.GetRequest{Context: rctx, Key: key, Version: f.tso(t, 1)}); err != nil {
		t.Fatalf("served after a refused call: %v", err)
	}
}

func TestUnsupportedCallsFailLoudly(t *testing.T) {
	f := startFixture(t)
	rctx := f.regionCtx(t, "a")
	expectUnimplemented := func(method string, err error) {
		t.Helper()
		if status.Code(err) != codes.Unimplemented || !strings.Contains(status.Convert(err).Message(), method) {
			t.Errorf("%s: got %v, want Unimplemented naming the method", method, err)
		}
		if !strings.Contains(f.logs.String(), "UNIMPLEMENTED "+method) {
			t.Errorf("%s: no UNIMPLEMENTED line on stderr; log:\n%s", method, f.logs.String())
		}
	}
	// Registered service, method not implemented here.
	_, err := f.kv.KvCheckSecondaryLocks(f.ctx, &kvrpcpb.CheckSecondaryLocksRequest{Context: rctx})
	expectUnimplemented("/tikvpb.Tikv/KvCheckSecondaryLocks", err)
	_, err = f.pd.AllocID(f.ctx, &pdpb.AllocIDRequest{})
	expectUnimplemented("/pdpb.PD/AllocID", err)
	// A service that is not registered at all.
	err = f.conn.Invoke(f.ctx, "/keyspacepb.Keyspace/LoadKeyspace", &keyspacepb.LoadKeyspaceRequest{Name: "x"}, &keyspacepb.LoadKeyspaceResponse{})
	expectUnimplemented("/keyspacepb.Keyspace/LoadKeyspace", err)
	// A form of an implemented call that the model would misread.
	_, err = f.kv.KvResolveLock(f.ctx, &kvrpcpb.ResolveLockRequest{Context: rctx, TxnInfos: []*kvrpcpb.TxnInfo{{Txn: 1}}})
	expectUnimplemented("/tikvpb.Tikv/KvResolveLock", err)
}

// TestTheOtherMethodsAnswer calls the implemented methods the RecordStore
// suite does not use, each through gRPC, and checks the model's answer.
func TestTheOtherMethodsAnswer(t *testing.T) {
	f := startFixture(t)
	a, z := f.regionCtx(t, "a"), f.regionCtx(t, "z")

	stores, err := f.pd.GetAllStores(f.ctx, &pdpb.GetAllStoresRequest{ExcludeTombstoneStores: true})
	if err != nil || len(stores.Stores) != 1 || stores.Stores[0].Address != f.srv.kvAddr {
		t.Fatalf("GetAllStores: %v %v", stores, err)
	}
	prev, err := f.pd.GetPrevRegion(f.ctx, &pdpb.GetRegionRequest{RegionKey: codec.EncodeBytes(nil, []byte("z"))})
	if err != nil || prev.Region.GetId() != a.RegionId {
		t.Fatalf("GetPrevRegion: %v %v", prev, err)
	}
	sp, err := f.pd.UpdateGCSafePoint(f.ctx, &pdpb.UpdateGCSafePointRequest{SafePoint: 100})
	if err != nil || sp.NewSafePoint != 100 {
		t.Fatalf("UpdateGCSafePoint: %v %v", sp, err)
	}

	prewrite := func(rctx *kvrpcpb.Context, key string, start uint64) {
		t.Helper()
		resp, err := f.kv.KvPrewrite(f.ctx, &kvrpcpb.PrewriteRequest{
			Context: rctx, Mutations: []*kvrpcpb.Mutation{{Op: kvrpcpb.Op_Put, Key: []byte(key), Value: []byte("v")}},
			PrimaryLock: []byte(key), StartVersion: start, LockTtl: 3000,
		})
		if err != nil || len(resp.Errors) != 0 || resp.RegionError != nil {
			t.Fatalf("prewrite %s: %v %v", key, resp, err)
		}
	}
	start := f.tso(t, 1)
	prewrite(a, "b", start)
	hb, err := f.kv.KvTxnHeartBeat(f.ctx, &kvrpcpb.TxnHeartBeatRequest{Context: a, PrimaryLock: []byte("b"), StartVersion: start, AdviseLockTtl: 90_000})
	if err != nil || hb.Error != nil || hb.LockTtl != 90_000 {
		t.Fatalf("KvTxnHeartBeat: %v %v", hb, err)
	}
	locks, err := f.kv.KvScanLock(f.ctx, &kvrpcpb.ScanLockRequest{Context: a, MaxVersion: f.tso(t, 1), Limit: 10})
	if err != nil || len(locks.Locks) != 1 || string(locks.Locks[0].Key) != "b" {
		t.Fatalf("KvScanLock: %v %v", locks, err)
	}
	rb, err := f.kv.KvBatchRollback(f.ctx, &kvrpcpb.BatchRollbackRequest{Context: a, StartVersion: start, Keys: [][]byte{[]byte("b")}})
	if err != nil || rb.Error != nil {
		t.Fatalf("KvBatchRollback: %v %v", rb, err)
	}
	got, err := f.kv.KvBatchGet(f.ctx, &kvrpcpb.BatchGetRequest{Context: a, Keys: [][]byte{[]byte("b")}, Version: f.tso(t, 1)})
	if err != nil || len(got.Pairs) != 0 {
		t.Fatalf("KvBatchGet after rollback: %v %v", got, err)
	}

	// An expired lock cleaned up on its own key.
	old := f.tso(t, 1)
	prewrite(z, "zz", old)
	cleanup, err := f.kv.KvCleanup(f.ctx, &kvrpcpb.CleanupRequest{Context: z, Key: []byte("zz"), StartVersion: old, CurrentTs: (uint64(time.Now().Add(time.Hour).UnixMilli()) << logicalBits)})
	if err != nil || cleanup.Error != nil {
		t.Fatalf("KvCleanup: %v %v", cleanup, err)
	}

	pess := f.tso(t, 1)
	lock, err := f.kv.KvPessimisticLock(f.ctx, &kvrpcpb.PessimisticLockRequest{
		Context: a, Mutations: []*kvrpcpb.Mutation{{Op: kvrpcpb.Op_PessimisticLock, Key: []byte("d")}},
		PrimaryLock: []byte("d"), StartVersion: pess, ForUpdateTs: pess, LockTtl: 3000,
	})
	if err != nil || len(lock.Errors) != 0 || lock.RegionError != nil {
		t.Fatalf("KvPessimisticLock: %v %v", lock, err)
	}
	unlock, err := f.kv.KVPessimisticRollback(f.ctx, &kvrpcpb.PessimisticRollbackRequest{Context: a, StartVersion: pess, ForUpdateTs: pess, Keys: [][]byte{[]byte("d")}})
	if err != nil || len(unlock.Errors) != 0 {
		t.Fatalf("KVPessimisticRollback: %v %v", unlock, err)
	}
	locks, err = f.kv.KvScanLock(f.ctx, &kvrpcpb.ScanLockRequest{Context: a, MaxVersion: f.tso(t, 1), Limit: 10})
	if err != nil || len(locks.Locks) != 0 {
		t.Fatalf("locks left: %v %v", locks, err)
	}
}

// A server in a pod listens on every address and names its own to clients:
// PD's member list and its store address carry the advertised host.
func TestClientsAreToldTheAdvertisedHost(t *testing.T) {
	logger.SetOutput(&syncBuffer{})
	srv, err := start(listenConfig{host: "127.0.0.1", advertise: "localhost"}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.stop()
	for name, addr := range map[string]string{"PD": srv.pdAddr, "TiKV": srv.kvAddr} {
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host != "localhost" || port == "0" {
			t.Fatalf("%s is named %q, want localhost and its listener's port", name, addr)
		}
	}
	conn, err := grpc.Dial(srv.pdAddr, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatalf("dial %s: %v", srv.pdAddr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pd := pdpb.NewPDClient(conn)
	members, err := pd.GetMembers(ctx, &pdpb.GetMembersRequest{})
	if err != nil || len(members.Leader.GetClientUrls()) != 1 || members.Leader.GetClientUrls()[0] != "http://"+srv.pdAddr {
		t.Fatalf("members %v (%v), want the advertised %s", members, err, srv.pdAddr)
	}
	store, err := pd.GetStore(ctx, &pdpb.GetStoreRequest{StoreId: srv.storeID})
	if err != nil || store.Store.GetAddress() != srv.kvAddr {
		t.Fatalf("store address %v (%v), want the advertised %s", store.GetStore().GetAddress(), err, srv.kvAddr)
	}
}
