// pd.go serves PD's gRPC service (pdpb.PD) from the mock PD client of
// client-go's testutils, which answers from the mock cluster's metadata
// (stores, regions, leaders). Only timestamps are issued here: the mock's
// GetTS hands out one timestamp per call, while PD's Tso stream reserves a
// batch of `count` timestamps per request.
package main

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/pingcap/kvproto/pkg/metapb"
	"github.com/pingcap/kvproto/pkg/pdpb"
	pd "github.com/tikv/pd/client"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// logicalBits is the width of the logical part of a TSO timestamp
// (version = physical_ms << 18 | logical), as in PD and the TiKV clients.
const logicalBits = 18

type pdServer struct {
	pdpb.UnimplementedPDServer
	addr      string
	clusterID uint64
	mock      pd.Client
	tso       tsoAllocator
}

func newPDServer(addr string, mock pd.Client) *pdServer {
	return &pdServer{addr: addr, clusterID: mock.GetClusterID(context.Background()), mock: mock}
}

func (s *pdServer) header() *pdpb.ResponseHeader {
	return &pdpb.ResponseHeader{ClusterId: s.clusterID}
}

// errorHeader reports a failure the way PD does: in the response header, which
// the clients turn into an error.
func (s *pdServer) errorHeader(err error) *pdpb.ResponseHeader {
	return &pdpb.ResponseHeader{
		ClusterId: s.clusterID,
		Error:     &pdpb.Error{Type: pdpb.ErrorType_UNKNOWN, Message: err.Error()},
	}
}

func (s *pdServer) member() *pdpb.Member {
	url := "http://" + s.addr
	return &pdpb.Member{Name: "tikv-testserver-pd", MemberId: 1, ClientUrls: []string{url}, PeerUrls: []string{url}}
}

// GetMembers: a one-member PD cluster whose leader is this server.
func (s *pdServer) GetMembers(context.Context, *pdpb.GetMembersRequest) (*pdpb.GetMembersResponse, error) {
	m := s.member()
	return &pdpb.GetMembersResponse{Header: s.header(), Members: []*pdpb.Member{m}, Leader: m, EtcdLeader: m}, nil
}

// Tso answers each request of the stream with the last of `count` fresh,
// strictly increasing timestamps.
func (s *pdServer) Tso(stream pdpb.PD_TsoServer) error {
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		count := req.GetCount()
		if count == 0 || count >= 1<<logicalBits {
			return status.Errorf(codes.InvalidArgument, "Tso: count %d out of range", count)
		}
		physical, logical := s.tso.reserve(int64(count))
		if err := stream.Send(&pdpb.TsoResponse{
			Header:    s.header(),
			Count:     count,
			Timestamp: &pdpb.Timestamp{Physical: physical, Logical: logical},
		}); err != nil {
			return err
		}
	}
}

func (s *pdServer) regionResponse(r *pd.Region, err error) (*pdpb.GetRegionResponse, error) {
	if err != nil {
		return &pdpb.GetRegionResponse{Header: s.errorHeader(err)}, nil
	}
	// As PD does, an unknown region is an answer without a region.
	if r == nil || r.Meta == nil {
		return &pdpb.GetRegionResponse{Header: s.header()}, nil
	}
	return &pdpb.GetRegionResponse{Header: s.header(), Region: r.Meta, Leader: r.Leader, Buckets: r.Buckets}, nil
}

// GetRegion: the region containing the (memcomparable-encoded) key.
func (s *pdServer) GetRegion(ctx context.Context, req *pdpb.GetRegionRequest) (*pdpb.GetRegionResponse, error) {
	return s.regionResponse(s.mock.GetRegion(ctx, req.GetRegionKey()))
}

// GetPrevRegion: the region before the one containing the key.
func (s *pdServer) GetPrevRegion(ctx context.Context, req *pdpb.GetRegionRequest) (*pdpb.GetRegionResponse, error) {
	return s.regionResponse(s.mock.GetPrevRegion(ctx, req.GetRegionKey()))
}

// GetRegionByID: the region with that id.
func (s *pdServer) GetRegionByID(ctx context.Context, req *pdpb.GetRegionByIDRequest) (*pdpb.GetRegionResponse, error) {
	return s.regionResponse(s.mock.GetRegionByID(ctx, req.GetRegionId()))
}

// ScanRegions: up to `limit` regions overlapping [start_key, end_key).
func (s *pdServer) ScanRegions(ctx context.Context, req *pdpb.ScanRegionsRequest) (*pdpb.ScanRegionsResponse, error) {
	regions, err := s.mock.ScanRegions(ctx, req.GetStartKey(), req.GetEndKey(), int(req.GetLimit()))
	if err != nil {
		return &pdpb.ScanRegionsResponse{Header: s.errorHeader(err)}, nil
	}
	resp := &pdpb.ScanRegionsResponse{Header: s.header()}
	for _, r := range regions {
		resp.RegionMetas = append(resp.RegionMetas, r.Meta)
		resp.Leaders = append(resp.Leaders, r.Leader)
		resp.Regions = append(resp.Regions, &pdpb.Region{Region: r.Meta, Leader: r.Leader})
	}
	return resp, nil
}

// GetStore: one store's metadata (its address is the TiKV service).
func (s *pdServer) GetStore(ctx context.Context, req *pdpb.GetStoreRequest) (*pdpb.GetStoreResponse, error) {
	store, err := s.mock.GetStore(ctx, req.GetStoreId())
	if err != nil {
		return &pdpb.GetStoreResponse{Header: s.errorHeader(err)}, nil
	}
	return &pdpb.GetStoreResponse{Header: s.header(), Store: store}, nil
}

// GetAllStores: every store's metadata.
func (s *pdServer) GetAllStores(ctx context.Context, req *pdpb.GetAllStoresRequest) (*pdpb.GetAllStoresResponse, error) {
	stores, err := s.mock.GetAllStores(ctx)
	if err != nil {
		return &pdpb.GetAllStoresResponse{Header: s.errorHeader(err)}, nil
	}
	if req.GetExcludeTombstoneStores() {
		live := stores[:0]
		for _, st := range stores {
			if st.GetState() != metapb.StoreState_Tombstone {
				live = append(live, st)
			}
		}
		stores = live
	}
	return &pdpb.GetAllStoresResponse{Header: s.header(), Stores: stores}, nil
}

// UpdateGCSafePoint: the mock keeps the largest safe point it was given.
func (s *pdServer) UpdateGCSafePoint(ctx context.Context, req *pdpb.UpdateGCSafePointRequest) (*pdpb.UpdateGCSafePointResponse, error) {
	sp, err := s.mock.UpdateGCSafePoint(ctx, req.GetSafePoint())
	if err != nil {
		return &pdpb.UpdateGCSafePointResponse{Header: s.errorHeader(err)}, nil
	}
	return &pdpb.UpdateGCSafePointResponse{Header: s.header(), NewSafePoint: sp}, nil
}

// tsoAllocator issues hybrid timestamps: wall-clock milliseconds and an
// 18-bit logical counter, never going backwards (if the clock does, or the
// counter overflows within a millisecond, the physical part moves ahead).
type tsoAllocator struct {
	mu       sync.Mutex
	physical int64
	logical  int64
}

// reserve allocates count consecutive timestamps and returns the last one.
func (t *tsoAllocator) reserve(count int64) (physical, logical int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if now := time.Now().UnixMilli(); now > t.physical {
		t.physical, t.logical = now, 0
	}
	if t.logical+count >= 1<<logicalBits {
		t.physical, t.logical = t.physical+1, 0
	}
	t.logical += count
	return t.physical, t.logical
}
