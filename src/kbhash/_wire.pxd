# Little-endian readers and writers for the compiled codecs.  Readers take a
# pointer the caller has already bounds-checked; they assemble values byte by
# byte, so the result does not depend on the host's byte order (compilers turn
# this into a single load on little-endian machines).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy

cdef inline uint16_t rd_u16(const unsigned char* p) noexcept nogil:
    return <uint16_t>p[0] | (<uint16_t>p[1] << 8)

cdef inline uint32_t rd_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline uint64_t rd_u64(const unsigned char* p) noexcept nogil:
    return <uint64_t>rd_u32(p) | (<uint64_t>rd_u32(p + 4) << 32)

cdef inline double rd_f64(const unsigned char* p) noexcept nogil:
    cdef uint64_t u = rd_u64(p)
    cdef double d
    memcpy(&d, &u, 8)
    return d

cdef inline float rd_f32(const unsigned char* p) noexcept nogil:
    cdef uint32_t u = rd_u32(p)
    cdef float f
    memcpy(&f, &u, 4)
    return f

cdef inline void wr_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xff
    p[1] = (v >> 8) & 0xff
    p[2] = (v >> 16) & 0xff
    p[3] = (v >> 24) & 0xff

cdef inline void wr_u64(unsigned char* p, uint64_t v) noexcept nogil:
    wr_u32(p, <uint32_t>(v & 0xffffffffU))
    wr_u32(p + 4, <uint32_t>(v >> 32))

cdef inline void wr_f64(unsigned char* p, double d) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &d, 8)
    wr_u64(p, u)

cdef inline void wr_f32(unsigned char* p, float f) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &f, 4)
    wr_u32(p, u)
