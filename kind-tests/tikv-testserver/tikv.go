// tikv.go serves TiKV's gRPC service (tikvpb.Tikv): every implemented method
// wraps its request in a tikvrpc.Request and hands it to the mock TiKV's
// SendRequest, the same entry point client-go's own tests use, so region
// checks, MVCC reads and writes, conflicts, locks and their resolution all
// come from the TiKV project's model, not from code here.
//
// Three answers are adjusted where the model leaves out a field that TiKV
// sets and tikv-client relies on, or misreads a request (compat shims, each
// documented at its method): KvGet's not_found, KvCheckTxnStatus's lock_info,
// and KvResolveLock's batch form (txn_infos), which is refused.
package main

import (
	"context"
	"time"

	"github.com/pingcap/kvproto/pkg/kvrpcpb"
	"github.com/pingcap/kvproto/pkg/tikvpb"
	"github.com/tikv/client-go/v2/testutils"
	"github.com/tikv/client-go/v2/tikvrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// defaultTimeout applies to calls that arrive without a deadline.
const defaultTimeout = time.Minute

type tikvServer struct {
	tikvpb.UnimplementedTikvServer
	addr string
	mock *testutils.MockClient
}

func newTikvServer(addr string, mock *testutils.MockClient) *tikvServer {
	return &tikvServer{addr: addr, mock: mock}
}

// dispatch sends one request to the mock store as the store at s.addr and
// returns its typed response. A panic in the model (it panics on a key outside
// the addressed region, where TiKV would answer with a region error) becomes an
// Internal error naming the method, and a line on stderr.
func dispatch[Resp any](ctx context.Context, s *tikvServer, method string, cmd tikvrpc.CmdType, req interface{}, reqCtx **kvrpcpb.Context) (resp *Resp, err error) {
	if *reqCtx == nil {
		*reqCtx = &kvrpcpb.Context{}
	}
	defer func() {
		if r := recover(); r != nil {
			logger.Printf("%s: the mock store panicked: %v", method, r)
			resp, err = nil, status.Errorf(codes.Internal, "tikv-testserver %s: the mock store panicked: %v", method, r)
		}
	}()
	timeout := defaultTimeout
	if deadline, ok := ctx.Deadline(); ok {
		timeout = time.Until(deadline)
	}
	out, err := s.mock.SendRequest(ctx, s.addr, tikvrpc.NewRequest(cmd, req, **reqCtx), timeout)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, status.FromContextError(ctxErr).Err()
		}
		return nil, status.Errorf(codes.Unknown, "tikv-testserver %s: %v", method, err)
	}
	typed, ok := out.Resp.(*Resp)
	if !ok {
		return nil, status.Errorf(codes.Internal, "tikv-testserver %s: the mock store answered with %T", method, out.Resp)
	}
	return typed, nil
}

// KvGet reads one key at a snapshot.
//
// Compat: the model never sets not_found; it answers a missing key with an
// empty value. tikv-client reads not_found (as TiKV sets it), so it is set
// here for an empty value. As in the model (and in client-go, which treats an
// empty value as absent), a key stored with an empty value reads as missing.
func (s *tikvServer) KvGet(ctx context.Context, in *kvrpcpb.GetRequest) (*kvrpcpb.GetResponse, error) {
	resp, err := dispatch[kvrpcpb.GetResponse](ctx, s, "KvGet", tikvrpc.CmdGet, in, &in.Context)
	if err != nil {
		return nil, err
	}
	if resp.RegionError == nil && resp.Error == nil && len(resp.Value) == 0 {
		resp.NotFound = true
	}
	return resp, nil
}

// KvScan reads a key range at a snapshot (forward or reverse, with a limit).
func (s *tikvServer) KvScan(ctx context.Context, in *kvrpcpb.ScanRequest) (*kvrpcpb.ScanResponse, error) {
	return dispatch[kvrpcpb.ScanResponse](ctx, s, "KvScan", tikvrpc.CmdScan, in, &in.Context)
}

// KvBatchGet reads several keys at a snapshot. Missing keys are left out, and
// not_founds stays empty, which tikv-client reads as "empty value = absent".
func (s *tikvServer) KvBatchGet(ctx context.Context, in *kvrpcpb.BatchGetRequest) (*kvrpcpb.BatchGetResponse, error) {
	return dispatch[kvrpcpb.BatchGetResponse](ctx, s, "KvBatchGet", tikvrpc.CmdBatchGet, in, &in.Context)
}

// KvPrewrite is the first phase of two-phase commit: lock and stage mutations,
// detecting write conflicts and existing locks.
func (s *tikvServer) KvPrewrite(ctx context.Context, in *kvrpcpb.PrewriteRequest) (*kvrpcpb.PrewriteResponse, error) {
	return dispatch[kvrpcpb.PrewriteResponse](ctx, s, "KvPrewrite", tikvrpc.CmdPrewrite, in, &in.Context)
}

// KvCommit is the second phase: turn the transaction's locks into writes.
func (s *tikvServer) KvCommit(ctx context.Context, in *kvrpcpb.CommitRequest) (*kvrpcpb.CommitResponse, error) {
	return dispatch[kvrpcpb.CommitResponse](ctx, s, "KvCommit", tikvrpc.CmdCommit, in, &in.Context)
}

// KvCleanup rolls back one key of a transaction whose lock has expired (the
// older form of lock resolution; CheckTxnStatus replaced it).
func (s *tikvServer) KvCleanup(ctx context.Context, in *kvrpcpb.CleanupRequest) (*kvrpcpb.CleanupResponse, error) {
	return dispatch[kvrpcpb.CleanupResponse](ctx, s, "KvCleanup", tikvrpc.CmdCleanup, in, &in.Context)
}

// KvBatchRollback rolls back a transaction's keys.
func (s *tikvServer) KvBatchRollback(ctx context.Context, in *kvrpcpb.BatchRollbackRequest) (*kvrpcpb.BatchRollbackResponse, error) {
	return dispatch[kvrpcpb.BatchRollbackResponse](ctx, s, "KvBatchRollback", tikvrpc.CmdBatchRollback, in, &in.Context)
}

// KvScanLock lists locks older than max_version in the addressed region.
func (s *tikvServer) KvScanLock(ctx context.Context, in *kvrpcpb.ScanLockRequest) (*kvrpcpb.ScanLockResponse, error) {
	return dispatch[kvrpcpb.ScanLockResponse](ctx, s, "KvScanLock", tikvrpc.CmdScanLock, in, &in.Context)
}

// KvResolveLock commits (commit_version > 0) or rolls back a transaction's
// locks in the addressed region.
//
// Compat: the model handles only the single-transaction form and ignores
// txn_infos; a batch request (tikv-client sends one only from its GC lock
// clean-up, TransactionClient::cleanup_locks) would silently resolve nothing,
// so it is refused instead.
func (s *tikvServer) KvResolveLock(ctx context.Context, in *kvrpcpb.ResolveLockRequest) (*kvrpcpb.ResolveLockResponse, error) {
	if len(in.TxnInfos) > 0 {
		return nil, status.Error(codes.Unimplemented, "KvResolveLock with txn_infos (batch resolve) is not supported by the mock store")
	}
	return dispatch[kvrpcpb.ResolveLockResponse](ctx, s, "KvResolveLock", tikvrpc.CmdResolveLock, in, &in.Context)
}

// KvCheckTxnStatus decides the fate of a transaction from its primary lock:
// committed, rolled back (also when its TTL has expired), or still alive.
//
// Compat: for a live lock the model answers lock_ttl without lock_info;
// TiKV sends the primary lock's info with it, and tikv-client requires it
// (a live status without it is unreachable!() there). It is filled in here
// from the model's own record of the lock (its debugger view of the key).
func (s *tikvServer) KvCheckTxnStatus(ctx context.Context, in *kvrpcpb.CheckTxnStatusRequest) (*kvrpcpb.CheckTxnStatusResponse, error) {
	const attempts = 3
	for attempt := 1; ; attempt++ {
		resp, err := dispatch[kvrpcpb.CheckTxnStatusResponse](ctx, s, "KvCheckTxnStatus", tikvrpc.CmdCheckTxnStatus, in, &in.Context)
		if err != nil || resp.RegionError != nil || resp.Error != nil || resp.LockTtl == 0 || resp.LockInfo != nil {
			return resp, err
		}
		info, err := s.primaryLock(in.PrimaryKey, in.LockTs)
		if err != nil {
			return nil, err
		}
		if info != nil {
			info.LockTtl = resp.LockTtl
			resp.LockInfo = info
			return resp, nil
		}
		// The lock went (committed or rolled back) between the two reads:
		// ask again, and the model answers with the final status.
		if attempt == attempts {
			return nil, status.Errorf(codes.Internal, "tikv-testserver KvCheckTxnStatus: lock of txn %d on its primary key kept changing", in.LockTs)
		}
	}
}

// mvccDebugger is the model's view of one key's MVCC record (lock, writes).
type mvccDebugger interface {
	MvccGetByKey(key []byte) *kvrpcpb.MvccInfo
}

// primaryLock returns the lock of transaction startTS on key, or nil if there
// is none.
func (s *tikvServer) primaryLock(key []byte, startTS uint64) (*kvrpcpb.LockInfo, error) {
	debugger, ok := s.mock.MvccStore.(mvccDebugger)
	if !ok {
		return nil, status.Error(codes.Internal, "tikv-testserver KvCheckTxnStatus: the mock store cannot show a key's lock")
	}
	info := debugger.MvccGetByKey(key)
	if info == nil {
		return nil, status.Error(codes.Internal, "tikv-testserver KvCheckTxnStatus: the mock store could not read the primary key's record")
	}
	lock := info.GetLock()
	if lock == nil || lock.GetStartTs() != startTS {
		return nil, nil
	}
	return &kvrpcpb.LockInfo{
		PrimaryLock: lock.GetPrimary(),
		LockVersion: lock.GetStartTs(),
		Key:         key,
		LockType:    lock.GetType(),
	}, nil
}

// KvTxnHeartBeat extends the TTL of a live transaction's primary lock.
func (s *tikvServer) KvTxnHeartBeat(ctx context.Context, in *kvrpcpb.TxnHeartBeatRequest) (*kvrpcpb.TxnHeartBeatResponse, error) {
	return dispatch[kvrpcpb.TxnHeartBeatResponse](ctx, s, "KvTxnHeartBeat", tikvrpc.CmdTxnHeartBeat, in, &in.Context)
}

// KvPessimisticLock takes pessimistic locks (pessimistic transactions).
func (s *tikvServer) KvPessimisticLock(ctx context.Context, in *kvrpcpb.PessimisticLockRequest) (*kvrpcpb.PessimisticLockResponse, error) {
	return dispatch[kvrpcpb.PessimisticLockResponse](ctx, s, "KvPessimisticLock", tikvrpc.CmdPessimisticLock, in, &in.Context)
}

// KVPessimisticRollback releases pessimistic locks (the service spells this
// one method with a capital V).
func (s *tikvServer) KVPessimisticRollback(ctx context.Context, in *kvrpcpb.PessimisticRollbackRequest) (*kvrpcpb.PessimisticRollbackResponse, error) {
	return dispatch[kvrpcpb.PessimisticRollbackResponse](ctx, s, "KVPessimisticRollback", tikvrpc.CmdPessimisticRollback, in, &in.Context)
}
