/* The positioned reads of memstore/storage/direct.py, compiled: a batch's runs of blocks read by
 * pread on a few pthreads with the GIL released (the disk sees them at once), and the rows copied
 * out of the block buffer. Optional: direct.py falls back to os.preadv on a thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 4096

typedef struct {
    int fd;
    const int64_t *file_at, *lengths, *buffer_at;
    char *buffer;
    Py_ssize_t first, step, count;
    int error;
} job_t;

static void *read_some(void *arg) {
    job_t *job = (job_t *)arg;
    for (Py_ssize_t i = job->first; i < job->count; i += job->step) {
        int64_t done = 0, length = job->lengths[i];
        while (done < length) {
            ssize_t got = pread(job->fd, job->buffer + job->buffer_at[i] + done, (size_t)(length - done),
                                (off_t)(job->file_at[i] + done));
            if (got < 0) {
                if (errno == EINTR) continue;
                job->error = errno;
                return NULL;
            }
            if (got == 0 || got % BLOCK) break; /* end of file: a partial last block */
            done += got;
        }
    }
    return NULL;
}

/* pread_runs(fd, file_at, lengths, buffer_at, buffer, threads): read run i (lengths[i] bytes at
 * file_at[i]) into buffer[buffer_at[i]:], the int64 arrays given as buffers. OSError on failure. */
static PyObject *pread_runs(PyObject *self, PyObject *args) {
    int fd, threads;
    Py_buffer file_at, lengths, buffer_at, buffer;
    if (!PyArg_ParseTuple(args, "iy*y*y*w*i", &fd, &file_at, &lengths, &buffer_at, &buffer, &threads)) return NULL;
    Py_ssize_t count = file_at.len / 8;
    int error = 0;
    if (lengths.len / 8 != count || buffer_at.len / 8 != count) {
        PyErr_SetString(PyExc_ValueError, "file_at, lengths and buffer_at must have the same length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t at = ((int64_t *)buffer_at.buf)[i], length = ((int64_t *)lengths.buf)[i];
        if (at < 0 || length < 0 || at + length > buffer.len) {
            PyErr_SetString(PyExc_ValueError, "a run does not fit in the buffer");
            goto done;
        }
    }
    if (threads < 1) threads = 1;
    if (threads > count) threads = (int)(count ? count : 1);
    if (threads > 256) threads = 256;
    job_t jobs[256];
    pthread_t ids[256];
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){fd, file_at.buf, lengths.buf, buffer_at.buf, buffer.buf, t, threads, count, 0};
    }
    /* Thread 0 is this one; a thread that cannot be started has its share read here too. */
    int started[256] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, read_some, &jobs[t]) == 0;
    read_some(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else read_some(&jobs[t]);
    }
    for (int t = 0; t < threads; t++) {
        if (jobs[t].error) error = jobs[t].error;
    }
    Py_END_ALLOW_THREADS
    if (error) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
    }
done:
    PyBuffer_Release(&file_at);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&buffer_at);
    PyBuffer_Release(&buffer);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* copy_rows(buffer, positions, row_bytes, out): out[i] = buffer[positions[i] : positions[i] + row_bytes]. */
static PyObject *copy_rows(PyObject *self, PyObject *args) {
    Py_buffer buffer, positions, out;
    Py_ssize_t row_bytes;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &buffer, &positions, &row_bytes, &out)) return NULL;
    Py_ssize_t count = positions.len / 8;
    const int64_t *at = positions.buf;
    int ok = out.len == count * row_bytes;
    for (Py_ssize_t i = 0; ok && i < count; i++) ok = at[i] >= 0 && at[i] + row_bytes <= buffer.len;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) memcpy((char *)out.buf + i * row_bytes, (char *)buffer.buf + at[i], row_bytes);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_SetString(PyExc_ValueError, "positions or out do not fit the buffer and row size");
    }
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&positions);
    PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pread_runs", pread_runs, METH_VARARGS, "Read runs of a file into a buffer on a few threads."},
    {"copy_rows", copy_rows, METH_VARARGS, "Copy rows at byte positions of a buffer into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_directio", NULL, -1, methods};

PyMODINIT_FUNC PyInit__directio(void) { return PyModule_Create(&module); }
