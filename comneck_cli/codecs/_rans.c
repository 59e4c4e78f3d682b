/* A bounds-checked rANS decoder, bit-exact with CompressAI 1.2.8's (compressai/cpp_exts/rans/rans_interface.cpp).
 *
 * CompressAI's decoder reads 32-bit words from the string with no length check and trusts its tables, so a
 * crafted or damaged string makes it read outside its buffer (SIGSEGV), and in bypass mode a run of 0xF count
 * nibbles lets one symbol read arbitrarily far. This decoder runs the same arithmetic (Rans64 state, 16-bit
 * precision, 4-bit bypass nibbles, the same escape coding and integer wrap-around) with three guards:
 *
 *  - every word is read through next_word(), which refuses word k unless bytes [4k, 4k + 4) lie inside the
 *    string: no read can leave the buffer, whatever the state arithmetic does;
 *  - a bypass escape announcing more than 8 nibbles is refused: CompressAI's encoder writes at most 8 (a 32-bit
 *    raw value), so such a string cannot come from it, and the decoder's work per symbol stays bounded;
 *  - tables are checked once when a Tables object is built (row i starts at 0, increases strictly up to
 *    cdf_lengths[i], ends at 1 << 16; 3 <= cdf_lengths[i] <= row width), and every index is checked against the
 *    number of rows. With such a row the symbol search always stops inside it (cdf[0] = 0 <= cum_freq <
 *    1 << 16 = cdf[len - 1]) and every frequency is at least 1.
 *
 * On a string CompressAI's encoder wrote, the decoder reads exactly the words the encoder wrote (each
 * renormalisation undoes one of the encoder's), so it never meets a guard and returns CompressAI's symbols.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PRECISION 16
#define BYPASS_PRECISION 4
#define MAX_BYPASS_VAL ((1u << BYPASS_PRECISION) - 1)
#define MAX_BYPASS_NIBBLES 8 /* 32 bits of raw value: the most CompressAI's encoder writes for one symbol */
#define RANS64_L (1ull << 31)
#define MAX_OFFSET (1 << 24) /* symbols stay exact in float32 and value + offset cannot wrap in practice */

static PyObject *RansError;

/* ---- reading int32 buffers -------------------------------------------------------------------------------- */

static int get_int32_buffer(PyObject *obj, Py_buffer *view, int ndim, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *fmt = view->format ? view->format : "B";
    int native_int32 = !strcmp(fmt, "i") || !strcmp(fmt, "=i") || !strcmp(fmt, "@i") || (PY_LITTLE_ENDIAN && !strcmp(fmt, "<i"));
    if (view->itemsize != 4 || !native_int32) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous int32 buffer", what);
        PyBuffer_Release(view);
        return -1;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), not %d", what, ndim, view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* ---- Tables --------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int32_t *cdfs; /* count x width, row-major */
    int32_t *lengths;
    int32_t *offsets;
    Py_ssize_t count;
    Py_ssize_t width;
} TablesObject;

static void Tables_dealloc(TablesObject *self) {
    PyMem_Free(self->cdfs);
    PyMem_Free(self->lengths);
    PyMem_Free(self->offsets);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static const char *check_tables(const int32_t *cdfs, const int32_t *lengths, const int32_t *offsets,
                                Py_ssize_t count, Py_ssize_t width, Py_ssize_t *bad_row) {
    for (Py_ssize_t i = 0; i < count; ++i) {
        *bad_row = i;
        const int32_t *cdf = cdfs + i * width;
        int32_t len = lengths[i];
        if (len < 3 || len > width) return "its length is outside 3..row width";
        if (cdf[0] != 0) return "it does not start at 0";
        for (int32_t j = 0; j + 1 < len; ++j)
            if (cdf[j + 1] <= cdf[j]) return "it is not strictly increasing";
        if (cdf[len - 1] != (1 << PRECISION)) return "it does not end at 1 << 16";
        if (offsets[i] < -MAX_OFFSET || offsets[i] > MAX_OFFSET) return "its offset is out of range";
    }
    return NULL;
}

static PyObject *Tables_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cdfs", "cdf_lengths", "offsets", NULL};
    PyObject *cdfs_obj, *lengths_obj, *offsets_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &cdfs_obj, &lengths_obj, &offsets_obj)) return NULL;
    Py_buffer cdfs, lengths, offsets;
    if (get_int32_buffer(cdfs_obj, &cdfs, 2, "cdfs") < 0) return NULL;
    if (get_int32_buffer(lengths_obj, &lengths, 1, "cdf_lengths") < 0) {
        PyBuffer_Release(&cdfs);
        return NULL;
    }
    if (get_int32_buffer(offsets_obj, &offsets, 1, "offsets") < 0) {
        PyBuffer_Release(&cdfs);
        PyBuffer_Release(&lengths);
        return NULL;
    }
    TablesObject *self = NULL;
    Py_ssize_t count = cdfs.shape[0], width = cdfs.shape[1];
    if (count < 1 || lengths.shape[0] != count || offsets.shape[0] != count) {
        PyErr_Format(PyExc_ValueError, "entropy tables hold %zd CDF rows, %zd lengths and %zd offsets",
                     count, lengths.shape[0], offsets.shape[0]);
        goto done;
    }
    Py_ssize_t bad_row = 0;
    const char *problem = check_tables(cdfs.buf, lengths.buf, offsets.buf, count, width, &bad_row);
    if (problem) {
        PyErr_Format(PyExc_ValueError, "entropy table row %zd is not a valid CDF: %s", bad_row, problem);
        goto done;
    }
    self = (TablesObject *)type->tp_alloc(type, 0);
    if (!self) goto done;
    self->count = count;
    self->width = width;
    self->cdfs = PyMem_Malloc((size_t)(count * width) * sizeof(int32_t));
    self->lengths = PyMem_Malloc((size_t)count * sizeof(int32_t));
    self->offsets = PyMem_Malloc((size_t)count * sizeof(int32_t));
    if (!self->cdfs || !self->lengths || !self->offsets) {
        Py_CLEAR(self);
        PyErr_NoMemory();
        goto done;
    }
    memcpy(self->cdfs, cdfs.buf, (size_t)(count * width) * sizeof(int32_t));
    memcpy(self->lengths, lengths.buf, (size_t)count * sizeof(int32_t));
    memcpy(self->offsets, offsets.buf, (size_t)count * sizeof(int32_t));
done:
    PyBuffer_Release(&cdfs);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&offsets);
    return (PyObject *)self;
}

static PyTypeObject TablesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "comneck_cli._rans.Tables",
    .tp_doc = "Tables(cdfs, cdf_lengths, offsets): validated entropy tables (int32 buffers: 2-D, 1-D, 1-D).",
    .tp_basicsize = sizeof(TablesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Tables_new,
    .tp_dealloc = (destructor)Tables_dealloc,
};

/* ---- the decoder ---------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    Py_ssize_t words; /* whole 32-bit words in the string; a trailing partial word is never read */
    Py_ssize_t pos;   /* next word */
    uint64_t state;
} Decoder;

static int next_word(Decoder *d, uint32_t *word) {
    if (d->pos >= d->words) {
        PyErr_SetString(RansError, "the entropy-coded string ends early");
        return -1;
    }
    memcpy(word, d->data + 4 * d->pos, 4); /* native order, as CompressAI's uint32_t* reads */
    d->pos += 1;
    return 0;
}

static int decoder_init(Decoder *d, const uint8_t *data, Py_ssize_t size) {
    uint32_t lo, hi;
    d->data = data;
    d->words = size / 4;
    d->pos = 0;
    if (next_word(d, &lo) < 0 || next_word(d, &hi) < 0) return -1;
    d->state = (uint64_t)lo | ((uint64_t)hi << 32);
    return 0;
}

/* Rans64DecGetBits */
static int get_bits(Decoder *d, uint32_t n_bits, uint32_t *val) {
    uint64_t x = d->state;
    *val = (uint32_t)(x & ((1u << n_bits) - 1));
    x >>= n_bits;
    if (x < RANS64_L) {
        uint32_t word;
        if (next_word(d, &word) < 0) return -1;
        x = (x << 32) | word;
    }
    d->state = x;
    return 0;
}

static int decode_symbol(Decoder *d, const TablesObject *t, int32_t cdf_idx, int32_t *out) {
    if (cdf_idx < 0 || cdf_idx >= t->count) {
        PyErr_Format(RansError, "entropy table index %d is outside 0..%zd", (int)cdf_idx, t->count - 1);
        return -1;
    }
    const int32_t *cdf = t->cdfs + (Py_ssize_t)cdf_idx * t->width;
    const int32_t length = t->lengths[cdf_idx];
    const int32_t max_value = length - 2;

    /* Rans64DecGet, then the first entry above cum_freq: validated rows make s fall in 0..length - 2 */
    const uint32_t cum_freq = (uint32_t)(d->state & ((1u << PRECISION) - 1));
    int32_t s = 0;
    while (s + 1 < length - 1 && (uint32_t)cdf[s + 1] <= cum_freq) ++s;

    /* Rans64DecAdvance: unsigned arithmetic wraps exactly as CompressAI's does */
    const uint32_t start = (uint32_t)cdf[s], freq = (uint32_t)(cdf[s + 1] - cdf[s]);
    uint64_t x = d->state;
    x = freq * (x >> PRECISION) + (x & ((1ull << PRECISION) - 1)) - start;
    if (x < RANS64_L) {
        uint32_t word;
        if (next_word(d, &word) < 0) return -1;
        x = (x << 32) | word;
    }
    d->state = x;

    int32_t value = s;
    if (value == max_value) {
        /* bypass: a count nibble (CompressAI continues it with 0xF nibbles only for 15 or more), then the nibbles */
        uint32_t n_bypass;
        if (get_bits(d, BYPASS_PRECISION, &n_bypass) < 0) return -1;
        if (n_bypass > MAX_BYPASS_NIBBLES) {
            PyErr_SetString(RansError, "the entropy-coded string holds an escape longer than any encoder writes");
            return -1;
        }
        uint32_t raw = 0;
        for (uint32_t j = 0; j < n_bypass; ++j) {
            uint32_t val;
            if (get_bits(d, BYPASS_PRECISION, &val) < 0) return -1;
            raw |= val << (j * BYPASS_PRECISION);
        }
        /* CompressAI keeps raw_val in an int32_t: an arithmetic shift, wrapping additions */
        const int32_t raw_val = (int32_t)raw;
        value = raw_val >> 1;
        if (raw_val & 1)
            value = -value - 1;
        else
            value = (int32_t)((uint32_t)value + (uint32_t)max_value);
    }
    *out = (int32_t)((uint32_t)value + (uint32_t)t->offsets[cdf_idx]);
    return 0;
}

static PyObject *decode_into_bytes(Decoder *d, PyObject *indexes_obj, TablesObject *tables) {
    Py_buffer indexes;
    if (get_int32_buffer(indexes_obj, &indexes, 1, "indexes") < 0) return NULL;
    Py_ssize_t n = indexes.shape[0];
    PyObject *result = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int32_t));
    if (result) {
        int32_t *out = (int32_t *)PyBytes_AS_STRING(result);
        const int32_t *idx = indexes.buf;
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (decode_symbol(d, tables, idx[i], out + i) < 0) {
                Py_CLEAR(result);
                break;
            }
        }
    }
    PyBuffer_Release(&indexes);
    return result;
}

static PyObject *rans_decode_with_indexes(PyObject *module, PyObject *args) {
    Py_buffer string;
    PyObject *indexes_obj;
    TablesObject *tables;
    if (!PyArg_ParseTuple(args, "y*OO!", &string, &indexes_obj, &TablesType, &tables)) return NULL;
    Decoder d;
    PyObject *result = NULL;
    if (decoder_init(&d, string.buf, string.len) == 0) result = decode_into_bytes(&d, indexes_obj, tables);
    PyBuffer_Release(&string);
    return result;
}

/* ---- Stream: set_stream / decode_stream --------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *string; /* a bytes copy the decoder reads from */
    Decoder decoder;
} StreamObject;

static void Stream_dealloc(StreamObject *self) {
    Py_XDECREF(self->string);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Stream_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"string", NULL};
    Py_buffer string;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &string)) return NULL;
    PyObject *copy = PyBytes_FromStringAndSize(string.buf, string.len);
    PyBuffer_Release(&string);
    if (!copy) return NULL;
    StreamObject *self = (StreamObject *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(copy);
        return NULL;
    }
    self->string = copy;
    if (decoder_init(&self->decoder, (const uint8_t *)PyBytes_AS_STRING(copy), PyBytes_GET_SIZE(copy)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *Stream_decode(StreamObject *self, PyObject *args) {
    PyObject *indexes_obj;
    TablesObject *tables;
    if (!PyArg_ParseTuple(args, "OO!", &indexes_obj, &TablesType, &tables)) return NULL;
    return decode_into_bytes(&self->decoder, indexes_obj, tables);
}

static PyMethodDef Stream_methods[] = {
    {"decode", (PyCFunction)Stream_decode, METH_VARARGS,
     "decode(indexes, tables) -> bytes of int32 symbols; continues where the last call stopped."},
    {NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "comneck_cli._rans.Stream",
    .tp_doc = "Stream(string): a bounded rANS decoder that keeps its state between decode() calls.",
    .tp_basicsize = sizeof(StreamObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Stream_new,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_methods = Stream_methods,
};

/* ---- module ------------------------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"decode_with_indexes", rans_decode_with_indexes, METH_VARARGS,
     "decode_with_indexes(string, indexes, tables) -> bytes of int32 symbols."},
    {NULL},
};

static struct PyModuleDef rans_module = {
    PyModuleDef_HEAD_INIT, "comneck_cli._rans", "A bounds-checked rANS decoder, bit-exact with CompressAI's.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__rans(void) {
    if (PyType_Ready(&TablesType) < 0 || PyType_Ready(&StreamType) < 0) return NULL;
    PyObject *m = PyModule_Create(&rans_module);
    if (!m) return NULL;
    RansError = PyErr_NewException("comneck_cli._rans.RansError", PyExc_ValueError, NULL);
    if (!RansError || PyModule_AddObjectRef(m, "RansError", RansError) < 0 ||
        PyModule_AddObjectRef(m, "Tables", (PyObject *)&TablesType) < 0 ||
        PyModule_AddObjectRef(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
